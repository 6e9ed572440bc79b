//! The process's own sections: `server` (Pingora's `ServerConf`, checked
//! field by field), `listen` and `admin_listen`, and `limits` (client
//! connections).

use std::net::SocketAddr;
use std::time::Duration;

use pingora::server::configuration::ServerConf;
use serde_yaml::Value;

use super::file::FileLimits;
use serde::Deserialize;

use super::tls::TlsFiles;
use super::{err, limits, ConfigError, LimitsConfig, Listener};

/// A listener written as a map: `{addr, tls: {cert, key}, h2}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileListener {
    addr: String,
    tls: Option<FileTls>,
    h2: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileTls {
    cert: String,
    key: String,
}

/// `listen` and `admin_listen`: every address parsed (the overlap check is
/// [`check_listeners`], once the rest is known). A string is plain
/// HTTP/1.1; a map may add TLS, with HTTP/2 offered by default.
pub(super) fn convert_listeners(
    listen: &[Value],
    admin_listen: &str,
    errors: &mut Vec<ConfigError>,
) -> (Vec<Listener>, Option<SocketAddr>) {
    if listen.is_empty() {
        errors.push(err("listen", "must list at least one address"));
    }
    let listeners = listen
        .iter()
        .enumerate()
        .filter_map(|(i, v)| listener(&format!("listen[{i}]"), v, errors))
        .collect();
    (listeners, socket_addr("admin_listen", admin_listen, errors))
}

fn listener(at: &str, value: &Value, errors: &mut Vec<ConfigError>) -> Option<Listener> {
    if let Value::String(text) = value {
        return Some(Listener {
            addr: socket_addr(at, text, errors)?,
            tls: None,
            h2: false,
        });
    }
    let file: FileListener = match serde_yaml::from_value(value.clone()) {
        Ok(f) => f,
        Err(e) => {
            errors.push(err(
                at,
                format!("expected \"host:port\" or {{addr, tls: {{cert, key}}, h2}}: {e}"),
            ));
            return None;
        }
    };
    let addr = socket_addr(&format!("{at}.addr"), &file.addr, errors);
    let tls = file.tls.map(|t| TlsFiles {
        cert: t.cert,
        key: t.key,
    });
    let h2 = file.h2.unwrap_or(tls.is_some());
    if h2 && tls.is_none() {
        errors.push(err(
            format!("{at}.h2"),
            "HTTP/2 is offered on TLS listeners only (by ALPN); add tls or set h2: false",
        ));
    }
    Some(Listener {
        addr: addr?,
        tls,
        h2,
    })
}

/// Two listeners on one address would share its connections (Pingora binds
/// with SO_REUSEPORT), so client requests could reach the admin service.
/// An unspecified address (`0.0.0.0`, `[::]`) overlaps every address of its port.
pub(super) fn check_listeners(
    listen: &[Listener],
    admin: SocketAddr,
    errors: &mut Vec<ConfigError>,
) {
    let overlaps = |a: &SocketAddr, b: &SocketAddr| {
        a.port() == b.port()
            && a.port() != 0
            && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
    };
    for (i, l) in listen.iter().enumerate() {
        let a = &l.addr;
        if overlaps(a, &admin) {
            errors.push(err(
                format!("listen[{i}]"),
                format!("{a} overlaps admin_listen {admin}: they must be different ports"),
            ));
        }
        if let Some((j, b)) = listen[..i]
            .iter()
            .enumerate()
            .find(|(_, b)| overlaps(a, &b.addr))
        {
            errors.push(err(
                format!("listen[{i}]"),
                format!("{a} overlaps listen[{j}] {}", b.addr),
            ));
        }
    }
}

pub(super) fn convert_limits(l: &FileLimits, errors: &mut Vec<ConfigError>) -> LimitsConfig {
    let (at, timeout_ms) = (
        "limits.request_header_timeout_ms",
        l.request_header_timeout_ms,
    );
    limits::REQUEST_HEADER_TIMEOUT_MS.check(at, timeout_ms, errors);
    let (at, max) = ("limits.max_client_connections", l.max_client_connections);
    limits::MAX_CLIENT_CONNECTIONS.check(at, max, errors);
    LimitsConfig {
        request_header_timeout: Duration::from_millis(timeout_ms),
        max_client_connections: usize::try_from(max).unwrap_or(usize::MAX),
    }
}

/// The `server` section is Pingora's `ServerConf`, which ignores unknown keys;
/// tollgate rejects them, so a misspelt `grace_period_second` is not silently lost.
pub(super) fn convert_server(
    value: Option<Value>,
    errors: &mut Vec<ConfigError>,
) -> Option<ServerConf> {
    let value = match value {
        None | Some(Value::Null) => {
            return Some(with_tollgate_defaults(ServerConf::default(), false))
        }
        Some(v) => v,
    };
    let Value::Mapping(map) = &value else {
        errors.push(err(
            "server",
            "expected a mapping of Pingora server settings",
        ));
        return None;
    };
    // The fields ServerConf knows are the ones it serializes.
    let known = match serde_yaml::to_value(ServerConf::default()) {
        Ok(Value::Mapping(m)) => m,
        _ => serde_yaml::Mapping::new(),
    };
    let mut ok = true;
    for key in map.keys() {
        if !known.contains_key(key) {
            ok = false;
            let name = key.as_str().unwrap_or("?");
            let mut expected: Vec<&str> = known.keys().filter_map(Value::as_str).collect();
            expected.sort_unstable();
            errors.push(err(
                format!("server.{name}"),
                format!("unknown field, expected one of: {}", expected.join(", ")),
            ));
        }
    }
    let work_stealing_set = map.contains_key("work_stealing");
    if !ok || !limits::check_server(map, errors) {
        return None;
    }
    let conf: ServerConf = match serde_yaml::from_value(value) {
        Ok(c) => c,
        Err(e) => {
            errors.push(err("server", e.to_string()));
            return None;
        }
    };
    if conf.daemon_wait_for_ready {
        errors.push(err(
            "server.daemon_wait_for_ready",
            "not supported: tollgate takes over the sockets before it daemonizes, \
             so `serve -u -d` already returns only once the new process holds them",
        ));
        return None;
    }
    match conf.validate() {
        Ok(c) => Some(with_tollgate_defaults(c, work_stealing_set)),
        Err(e) => {
            errors.push(err("server", e.to_string()));
            None
        }
    }
}

/// Where the file leaves them out, tollgate's defaults differ from Pingora's:
///
/// - Pingora waits 300 s (`grace_period_seconds`) after a SIGTERM or SIGQUIT
///   before it stops, far past systemd's `TimeoutStopSec=30` in our unit;
///   tollgate's defaults keep a stop within ~15 s.
/// - `work_stealing: false`: each proxy thread runs its own connections, as
///   nginx's workers do. With stealing, even one thread runs a multi-thread
///   scheduler whose LIFO slot lets the last woken connection jump ~60
///   waiting ones; without it the hit path at 64 connections used 15-20%
///   less CPU per request with a p99 at nginx's (bench/RESULTS.md, issue 14).
fn with_tollgate_defaults(mut conf: ServerConf, work_stealing_set: bool) -> ServerConf {
    conf.grace_period_seconds
        .get_or_insert(limits::DEFAULT_GRACE_PERIOD_SECONDS);
    conf.graceful_shutdown_timeout_seconds
        .get_or_insert(limits::DEFAULT_GRACEFUL_SHUTDOWN_TIMEOUT_SECONDS);
    if !work_stealing_set {
        conf.work_stealing = false;
    }
    conf
}

fn socket_addr(path: &str, text: &str, errors: &mut Vec<ConfigError>) -> Option<SocketAddr> {
    match text.parse::<SocketAddr>() {
        Ok(a) => Some(a),
        Err(_) => {
            errors.push(err(
                path,
                format!("expected an IP address and port such as 127.0.0.1:8080, got \"{text}\""),
            ));
            None
        }
    }
}
