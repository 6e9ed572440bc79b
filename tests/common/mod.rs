//! Test harness: real HTTP origins on 127.0.0.1:0 inside the test process
//! (recording what they receive), and the real `tollgate` binary started on
//! free ports with a generated config, polled until ready, killed by PID.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener as StdListener, TcpStream as StdStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tempfile::TempDir;
use tokio::net::TcpListener;

mod origin;
pub mod pki;
pub mod redis_ha;
pub mod relay;

use origin::{serve, Handler};
pub use origin::{Reply, Request};
use pingora::tls::ssl::SslAcceptor;

/// How long anything may take to become ready before a test fails.
const READY_WITHIN: Duration = Duration::from_secs(20);

#[derive(Default)]
pub struct Recorder {
    pub requests: Mutex<Vec<Request>>,
    /// Requests whose client closed the connection during the delay, with when.
    pub closed_early: Mutex<Vec<(Request, Instant)>>,
    /// Replies whose unasked bytes went out.
    pub sent_unasked: Mutex<usize>,
    /// Replies written.
    pub answered: Mutex<usize>,
}

struct FnHandler<F> {
    f: F,
    rec: Arc<Recorder>,
}

impl<F: Fn(&Request) -> Reply + Send + Sync + 'static> Handler for FnHandler<F> {
    fn reply(&self, req: &Request) -> Reply {
        self.rec.requests.lock().unwrap().push(req.clone());
        (self.f)(req)
    }
    fn closed_early(&self, req: &Request) {
        self.rec
            .closed_early
            .lock()
            .unwrap()
            .push((req.clone(), Instant::now()));
    }
    fn sent_unasked(&self, _req: &Request) {
        *self.rec.sent_unasked.lock().unwrap() += 1;
    }
    fn answered(&self, _req: &Request) {
        *self.rec.answered.lock().unwrap() += 1;
    }
}

/// A real HTTP backend in this process.
pub struct Origin {
    pub addr: SocketAddr,
    pub rec: Arc<Recorder>,
    /// Speaks TLS (its URL is `https://localhost:PORT`).
    pub tls: bool,
    task: tokio::task::JoinHandle<()>,
}

impl Origin {
    pub async fn start(f: impl Fn(&Request) -> Reply + Send + Sync + 'static) -> Origin {
        Origin::listen(f, None).await
    }

    /// An https origin with a certificate for `localhost` from `pki`'s CA.
    pub async fn start_tls(
        pki: &pki::Pki,
        f: impl Fn(&Request) -> Reply + Send + Sync + 'static,
    ) -> Origin {
        Origin::listen(f, Some(pki.origin_acceptor())).await
    }

    async fn listen(
        f: impl Fn(&Request) -> Reply + Send + Sync + 'static,
        tls: Option<SslAcceptor>,
    ) -> Origin {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let rec = Arc::new(Recorder::default());
        let handler = Arc::new(FnHandler {
            f,
            rec: rec.clone(),
        });
        let is_tls = tls.is_some();
        let task = tokio::spawn(serve(listener, handler, tls.map(Arc::new)));
        Origin {
            addr,
            rec,
            tls: is_tls,
            task,
        }
    }

    /// Answers `{"status": <ok>, "from": <name>}` after `delay_ms`.
    pub async fn json(name: &'static str, ok: bool, delay_ms: u64) -> Origin {
        Origin::start(move |_| {
            Reply::json(200, format!(r#"{{"status": {ok}, "from": "{name}"}}"#))
                .after(Duration::from_millis(delay_ms))
        })
        .await
    }

    /// A backend with a deterministic long tail: answers `{"status": true,
    /// "from": <name>}`, every `every`th request (the `every`th, the
    /// 2×`every`th, …) after `slow_ms`, the others after `fast_ms`.
    pub async fn long_tail(name: &'static str, every: usize, fast_ms: u64, slow_ms: u64) -> Origin {
        let n = std::sync::atomic::AtomicUsize::new(0);
        Origin::start(move |_| {
            let i = n.fetch_add(1, Ordering::Relaxed) + 1;
            let delay = if i.is_multiple_of(every) {
                slow_ms
            } else {
                fast_ms
            };
            Reply::json(200, format!(r#"{{"status": true, "from": "{name}"}}"#))
                .after(Duration::from_millis(delay))
        })
        .await
    }

    /// Answers `status` with a JSON error body after `delay_ms`.
    pub async fn status(code: u16, delay_ms: u64) -> Origin {
        Origin::start(move |_| {
            Reply::json(code, r#"{"status": false}"#).after(Duration::from_millis(delay_ms))
        })
        .await
    }

    /// Answers 500 `{"status": false}` while the returned flag is set (it
    /// starts as `broken`), and 200 `{"status": true}` otherwise.
    pub async fn switchable(broken: bool) -> (Origin, Arc<AtomicBool>) {
        let broken = Arc::new(AtomicBool::new(broken));
        let flag = broken.clone();
        let origin = Origin::start(move |_| {
            if flag.load(Ordering::Relaxed) {
                Reply::json(500, r#"{"status": false}"#)
            } else {
                Reply::json(200, r#"{"status": true}"#)
            }
        })
        .await;
        (origin, broken)
    }

    pub fn url(&self) -> String {
        if self.tls {
            format!("https://localhost:{}", self.addr.port())
        } else {
            format!("http://{}", self.addr)
        }
    }

    pub fn requests(&self) -> Vec<Request> {
        self.rec.requests.lock().unwrap().clone()
    }

    pub fn hits(&self) -> usize {
        self.rec.requests.lock().unwrap().len()
    }

    pub fn closed_early(&self) -> Vec<(Request, Instant)> {
        self.rec.closed_early.lock().unwrap().clone()
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Poll `cond` (bounded by `within`) until it holds; fail naming `what`.
pub async fn wait_until(what: &str, within: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A port nothing listens on right now, and not handed out before in this
/// process: Pingora listens with SO_REUSEPORT, so two gateways given the same
/// port would both bind it and share its connections.
pub fn free_port() -> u16 {
    static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    loop {
        let port = StdListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut given = GIVEN.lock().unwrap();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

pub fn tollgate_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_tollgate"))
}

/// The real gateway, in its own process.
pub struct Gateway {
    child: Child,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub dir: TempDir,
    log_path: PathBuf,
}

/// A one-route section: `routes:` with the given backends and extra keys.
pub fn route(name: &str, prefix: &str, backends: &[&Origin], extra: &str) -> String {
    let urls: Vec<String> = backends
        .iter()
        .map(|o| format!("\"{}\"", o.url()))
        .collect();
    let mut s = format!(
        "  - name: {name}\n    prefix: {prefix}\n    backends: [{}]\n",
        urls.join(", ")
    );
    for line in extra.lines().filter(|l| !l.trim().is_empty()) {
        s.push_str("    ");
        s.push_str(line.trim());
        s.push('\n');
    }
    s
}

/// The API key every test gateway knows unless a test brings its own keys.
pub const KEY: &str = "tg_test_key_for_integration";

/// Plenty of credits and rate for tests that are not about them.
pub fn default_keys() -> String {
    format!("keys:\n  - {{key: \"{KEY}\", name: tests, credits: 1000000000, rate_per_second: 1000000}}\n")
}

impl Gateway {
    /// Start with these route entries (each from [`route`]) and extra
    /// top-level YAML, knowing the key [`KEY`].
    pub async fn start(routes: &[String], top: &str) -> Gateway {
        Gateway::start_with_keys(routes, top, &default_keys()).await
    }

    /// Start with this keys file. `{keys}` in `top` is replaced by its path;
    /// without a `store:` section in `top`, the embedded store reads it.
    pub async fn start_with_keys(routes: &[String], top: &str, keys: &str) -> Gateway {
        Gateway::start_with_server(routes, top, keys, "").await
    }

    /// As [`Gateway::start_with_keys`], with extra `server:` lines (each
    /// `  name: value\n`).
    pub async fn start_with_server(
        routes: &[String],
        top: &str,
        keys: &str,
        server: &str,
    ) -> Gateway {
        Gateway::start_listening(routes, top, keys, server, &[]).await
    }

    /// As [`Gateway::start_with_server`], with more `listen` entries after
    /// the plain one (YAML flow values, e.g. a TLS listener's map).
    pub async fn start_listening(
        routes: &[String],
        top: &str,
        keys: &str,
        server: &str,
        more_listen: &[String],
    ) -> Gateway {
        let dir = tempfile::tempdir().unwrap();
        let keys_path = dir.path().join("keys.yaml");
        std::fs::write(&keys_path, keys).unwrap();
        let top = if top.contains("store:") {
            top.to_string()
        } else {
            format!("store:\n  keys_file: {{keys}}\n{top}")
        }
        .replace("{keys}", &keys_path.display().to_string());
        let port = free_port();
        let admin_port = free_port();
        let listen: String = more_listen.iter().map(|l| format!(", {l}")).collect();
        let conf = format!(
            "server:\n  threads: 2\n{server}  pid_file: {d}/tollgate.pid\n  upgrade_sock: {d}/upgrade.sock\n\
             listen: [\"127.0.0.1:{port}\"{listen}]\nadmin_listen: \"127.0.0.1:{admin_port}\"\n{top}\nroutes:\n{}",
            routes.concat(),
            d = dir.path().display(),
        );
        let conf_path = dir.path().join("tollgate.yaml");
        std::fs::write(&conf_path, conf).unwrap();
        let log_path = dir.path().join("gateway.log");
        let log = std::fs::File::create(&log_path).unwrap();
        let child = Command::new(tollgate_bin())
            .args(["serve", "-c"])
            .arg(&conf_path)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut gw = Gateway {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            admin: SocketAddr::from(([127, 0, 0, 1], admin_port)),
            dir,
            log_path,
        };
        gw.wait_ready().await;
        gw
    }

    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + READY_WITHIN;
        let client = reqwest::Client::new();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "gateway exited with {status} before it was ready:\n{}",
                    self.logs()
                );
            }
            let health = client
                .get(format!("http://{}/healthz", self.admin))
                .send()
                .await
                .is_ok_and(|r| r.status() == 200);
            if health && StdStream::connect(self.addr).is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "gateway not ready:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Wait (bounded) until the log holds a line containing `needle`; return the log.
    pub async fn wait_log(&self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let logs = self.logs();
            if logs.contains(needle) {
                return logs;
            }
            assert!(
                Instant::now() < deadline,
                "no log line with {needle:?}:\n{logs}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub async fn metrics(&self) -> String {
        reqwest::get(format!("http://{}/metrics", self.admin))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The value of one sample line in Prometheus text, e.g.
/// `tollgate_requests_total{route="t",status="200"}`; 0 when absent.
pub fn sample(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Send raw bytes, read the whole answer (the request should say
/// `Connection: close`). Runs on a blocking thread.
pub async fn raw(addr: SocketAddr, request: Vec<u8>) -> String {
    tokio::task::spawn_blocking(move || {
        let mut s = StdStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(&request).unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    })
    .await
    .unwrap()
}

/// A `GET target` with [`KEY`], `Connection: close` and the given extra header lines.
pub fn get(target: &str, headers: &str) -> Vec<u8> {
    format!("GET {target} HTTP/1.1\r\nHost: test\r\nX-API-Key: {KEY}\r\n{headers}Connection: close\r\n\r\n")
        .into_bytes()
}

/// The status of a GET of `path` with [`KEY`].
pub async fn status(gw: &Gateway, path: &str) -> u16 {
    client()
        .get(gw.url(path))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// GET `url` with `key` in `X-API-Key`.
pub async fn get_with_key(url: impl reqwest::IntoUrl, key: &str) -> reqwest::Response {
    reqwest::Client::new()
        .get(url)
        .header("X-API-Key", key)
        .send()
        .await
        .unwrap()
}

/// One answer a client saw.
#[derive(Clone, Debug)]
pub struct Seen {
    pub sent: Instant,
    pub at: Instant,
    pub status: u16,
    /// The error code of an answer the gateway made (or its whole body).
    pub error: Option<String>,
}

impl Seen {
    pub fn took(&self) -> Duration {
        self.at - self.sent
    }
}

/// GET `url` with `key` in `X-API-Key`, the body read.
pub async fn seen(client: &reqwest::Client, url: &str, key: &str) -> Seen {
    let sent = Instant::now();
    let r = client
        .get(url)
        .header("X-API-Key", key)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let body = r.text().await.unwrap();
    let error = (status != 200).then(|| {
        let json: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        json["error"].as_str().unwrap_or(&body).to_string()
    });
    Seen {
        sent,
        at: Instant::now(),
        status,
        error,
    }
}

/// GET every URL at once with `key` in `X-API-Key`; the statuses, in order.
pub async fn statuses_at_once(urls: Vec<String>, key: &str) -> Vec<u16> {
    let client = reqwest::Client::new();
    let tasks = urls.into_iter().map(|url| {
        let req = client.get(url).header("X-API-Key", key);
        tokio::spawn(async move { req.send().await.unwrap().status().as_u16() })
    });
    futures::future::join_all(tasks)
        .await
        .into_iter()
        .map(|r| r.unwrap())
        .collect()
}

/// A client that sends [`KEY`] in `X-API-Key` on every request.
pub fn client() -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert("x-api-key", reqwest::header::HeaderValue::from_static(KEY));
    reqwest::Client::builder()
        .default_headers(headers)
        .build()
        .unwrap()
}

/// Status code and JSON body of a raw answer.
pub fn status_and_json(answer: &str) -> (u16, serde_json::Value) {
    let status = answer
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = answer.split("\r\n\r\n").nth(1).unwrap_or("");
    (
        status,
        serde_json::from_str(body).unwrap_or(serde_json::Value::Null),
    )
}

/// A real `redis-server` on a free loopback port, without persistence,
/// stopped by its PID when dropped.
pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    dir: TempDir,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        RedisServer::start_on(free_port())
    }

    /// Start on `port` (to restart a stopped server where clients expect it).
    pub fn start_on(port: u16) -> RedisServer {
        let dir = tempfile::tempdir().unwrap();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (.ci/test installs it)");
        let mut server = RedisServer {
            child: Some(child),
            port,
            dir,
        };
        server.wait_ready();
        server
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + READY_WITHIN;
        loop {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("redis-server exited with {status}");
            }
            if let Ok(mut s) = StdStream::connect(("127.0.0.1", self.port)) {
                let mut buf = [0u8; 16];
                s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
                if s.write_all(b"PING\r\n").is_ok()
                    && s.read(&mut buf)
                        .is_ok_and(|n| buf[..n].starts_with(b"+PONG"))
                {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "redis-server not ready on {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Stop it now (by PID), as an outage would.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stall it (SIGSTOP): connections stay open, commands wait unread.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Let a paused server go on (SIGCONT); it runs what waited.
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, sig: &str) {
        signal(
            self.child.as_ref().expect("redis-server is running").id(),
            sig,
        );
    }

    /// Every key and every value in the server, as text.
    pub async fn dump(&self) -> Vec<(String, Vec<String>)> {
        let client = redis::Client::open(self.url()).unwrap();
        let mut c = client.get_multiplexed_async_connection().await.unwrap();
        let names: Vec<String> = redis::cmd("KEYS")
            .arg("*")
            .query_async(&mut c)
            .await
            .unwrap();
        let mut out = Vec::new();
        for name in names {
            let kind: String = redis::cmd("TYPE")
                .arg(&name)
                .query_async(&mut c)
                .await
                .unwrap();
            let raw: Vec<Vec<u8>> = match kind.as_str() {
                "hash" => redis::cmd("HGETALL")
                    .arg(&name)
                    .query_async(&mut c)
                    .await
                    .unwrap(),
                "string" => vec![redis::cmd("GET")
                    .arg(&name)
                    .query_async(&mut c)
                    .await
                    .unwrap()],
                other => vec![format!("<{other}>").into_bytes()],
            };
            let values = raw
                .iter()
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .collect();
            out.push((name, values));
        }
        out
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
        let _ = &self.dir;
    }
}

/// Run `tollgate ARGS -c CONF`, returning (exit code, stdout, stderr).
pub fn tollgate(args: &[&str], conf: &std::path::Path) -> (i32, String, String) {
    let out = Command::new(tollgate_bin())
        .args(args)
        .arg("-c")
        .arg(conf)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A minimal config for the `keys` command against `redis`, in `dir`.
pub fn keys_conf(dir: &std::path::Path, redis: &RedisServer) -> PathBuf {
    let path = dir.join("keys-cli.yaml");
    let yaml = format!(
        "store:\n  redis_url: {}\nroutes:\n  - {{name: t, prefix: /, backends: [\"http://127.0.0.1:1\"]}}\n",
        redis.url()
    );
    std::fs::write(&path, yaml).unwrap();
    path
}

/// Send `sig` (`-TERM`, `-KILL`, …) to the process `pid` with `kill`.
pub fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig} {pid} failed");
}

/// Load a keys file's text into `redis` with `tollgate keys import`.
pub fn import_keys(redis: &RedisServer, keys: &str) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("keys.yaml");
    std::fs::write(&file, keys).unwrap();
    let conf = keys_conf(dir.path(), redis);
    let (code, out, err) = tollgate(&["keys", "import", "--init", file.to_str().unwrap()], &conf);
    assert_eq!(code, 0, "import failed: {out}{err}");
}

/// Run `promtool ARGS…` (Debian's prometheus package, which .ci/test
/// installs) and fail the test with its output unless it succeeds.
pub fn promtool(args: &[&str]) {
    let out = Command::new("promtool")
        .args(args)
        .output()
        .expect("promtool must be installed (.ci/test installs Debian's prometheus package)");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
