//! Graceful upgrade, both sides, in an order that cannot end in an outage.
//!
//! Pingora's upgrade: the new process (`serve -u`) listens on `upgrade_sock`
//! and waits there for the old one's listening sockets; the old one sends
//! them when it gets SIGQUIT, accepts 5 s more, drains and exits 0. Sent the
//! other way round (SIGQUIT first, as the unit used to), the old process was
//! told to go before anyone was known to be able to take over: a new process
//! that could not listen left nobody serving, and a SIGQUIT with no successor
//! drained the old one and ended it with status 0, which systemd does not
//! restart. So:
//!
//! - [`Signals`] (the old side): a SIGQUIT while no process waits on
//!   `upgrade_sock` is refused with an error line; the process keeps its
//!   sockets and serves on. After a hand-over the process exits 1 unless its
//!   proxy listeners live on in another process.
//! - [`preflight`] (the new side, before it waits for the sockets): every
//!   configured address the old process does not hold must be free to bind,
//!   or `serve -u` fails before the old process is asked for anything.
//! - [`reload`] (`tollgate reload`, the unit's `ExecReload`): starts
//!   `serve -u -d`, waits until that process waits on `upgrade_sock`, sends
//!   the old one SIGQUIT, then waits for the new PID file and for the new
//!   process's own `/healthz` to say every listener accepts. Any failure is
//!   its exit status and one line on stderr.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora::server::{ShutdownSignal, ShutdownSignalWatch};
use tokio::signal::unix::{signal, SignalKind};

use crate::config::{Config, Listener};
use crate::listeners;

/// The old side's signals: Pingora's meaning (SIGQUIT upgrade, SIGTERM
/// graceful stop, SIGINT fast stop), except that a SIGQUIT with nobody
/// waiting for the sockets is refused.
pub struct Signals {
    upgrade_sock: String,
    handed_over: Arc<AtomicBool>,
}

impl Signals {
    pub fn new(upgrade_sock: &str) -> Self {
        Signals {
            upgrade_sock: upgrade_sock.to_string(),
            handed_over: Arc::default(),
        }
    }

    /// Set once a SIGQUIT started a hand-over.
    pub fn handed_over(&self) -> Arc<AtomicBool> {
        self.handed_over.clone()
    }
}

#[async_trait]
impl ShutdownSignalWatch for Signals {
    async fn recv(&self) -> ShutdownSignal {
        let (Ok(mut quit), Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::quit()),
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            log::error!("cannot install signal handlers; stopping");
            return ShutdownSignal::GracefulTerminate;
        };
        loop {
            tokio::select! {
                _ = quit.recv() => {
                    if listeners::unix_listeners(&self.upgrade_sock).is_empty() {
                        log::error!(
                            "SIGQUIT, but no new process waits on {}: keeping the sockets and \
                             serving on (start `tollgate serve -u` first; `tollgate reload` does)",
                            self.upgrade_sock
                        );
                        continue;
                    }
                    log::info!("SIGQUIT: handing the listening sockets to the new process");
                    self.handed_over.store(true, Ordering::Relaxed);
                    return ShutdownSignal::GracefulUpgrade;
                }
                _ = term.recv() => return ShutdownSignal::GracefulTerminate,
                _ = int.recv() => return ShutdownSignal::FastShutdown,
            }
        }
    }
}

/// After a hand-over, whether the proxy listeners live on elsewhere (this
/// process has closed its own by now); if not, the hand-over failed. When
/// that cannot be told, it is assumed to have worked.
pub fn taken_over(listen: &[Listener]) -> bool {
    listen
        .iter()
        .all(|l| listeners::listened_on(l.addr).unwrap_or(true))
}

/// The PID a PID file names, if it names a running process.
pub fn running_pid(pid_file: &str) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(pid_file)
        .ok()?
        .trim()
        .parse()
        .ok()?;
    alive(pid).then_some(pid)
}

/// Whether `pid` runs (a zombie does not count).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        !stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
    })
}

/// Every address `config` listens on, with its field path.
fn addresses(config: &Config) -> Vec<(String, SocketAddr)> {
    let mut all: Vec<(String, SocketAddr)> = config
        .listen
        .iter()
        .enumerate()
        .map(|(i, l)| (format!("listen[{i}]"), l.addr))
        .collect();
    all.push(("admin_listen".into(), config.admin_listen));
    all
}

/// Before `serve -u` asks for the sockets: each address the running
/// process (`old`, when known) does not listen on must be free to bind.
pub fn preflight(config: &Config, old: Option<u32>) -> Result<(), String> {
    for (field, addr) in addresses(config) {
        let held = old.and_then(|pid| listeners::held_by(pid, addr));
        if held == Some(true) {
            continue;
        }
        if let Err(e) = listeners::probe(addr) {
            // Unknown holder (no PID file, or its descriptors unreadable):
            // it may be the old process, whose socket we will inherit.
            if held.is_none() && e.kind() == std::io::ErrorKind::AddrInUse {
                continue;
            }
            let who = old.map_or(String::new(), |pid| {
                format!("; the running process ({pid}) keeps serving")
            });
            return Err(format!("{field}: cannot listen on {addr}: {e}{who}"));
        }
    }
    Ok(())
}

/// Longest a reload may take (the unit's TimeoutStartSec is 30 s).
const RELOAD_WITHIN: Duration = Duration::from_secs(25);
const POLL: Duration = Duration::from_millis(20);

/// `tollgate reload`: hand over from the running process (`pid`, or the
/// one the PID file names) to a new one on `conf`. Returns what happened,
/// or why the reload failed (the running process then still serves unless
/// the message says otherwise).
pub fn reload(config: &Config, conf: &Path, pid: Option<u32>) -> Result<String, String> {
    let started = Instant::now();
    let deadline = started + RELOAD_WITHIN;
    let pid_file = &config.server.pid_file;
    let old = match pid {
        Some(p) if alive(p) => p,
        Some(p) => return Err(format!("process {p} is not running")),
        None => {
            running_pid(pid_file).ok_or_else(|| format!("{pid_file} names no running process"))?
        }
    };
    let exe = std::env::current_exe().map_err(|e| format!("cannot find own binary: {e}"))?;
    let mut new = Command::new(exe)
        .args(["serve", "-u", "-d", "-c"])
        .arg(conf)
        .stdin(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start the new process: {e}"))?;

    // 1. The new process waits on upgrade_sock (its own socket, not a stale one).
    wait_for_upgrade_sock(&mut new, &config.server.upgrade_sock, old, deadline)?;
    let waiting = started.elapsed();
    // 2. Only now is the old process asked for its sockets.
    send_quit(old)?;
    // 3. `serve -u -d` returns once it holds them and has forked.
    wait_for_hand_over(&mut new, old, deadline)?;
    let handed = started.elapsed();
    // 4. The PID file names the new daemon.
    let daemon = wait_for_new_pid(pid_file, old, deadline)?;
    // 5. The new process itself says every listener accepts.
    wait_until_ready(loopback(config.admin_listen), daemon, deadline)?;
    Ok(format!(
        "reloaded: process {old} handed over to {daemon} (new process waiting \
         {:.2} s, sockets held {:.2} s, serving {:.2} s after the start)",
        waiting.as_secs_f64(),
        handed.as_secs_f64(),
        started.elapsed().as_secs_f64()
    ))
}

/// Step 1: until the new process listens on `sock` itself.
fn wait_for_upgrade_sock(
    new: &mut Child,
    sock: &str,
    old: u32,
    deadline: Instant,
) -> Result<(), String> {
    loop {
        if let Some(status) = new.try_wait().map_err(|e| e.to_string())? {
            return Err(format!(
                "the new process exited ({status}) before it waited for the sockets; \
                 process {old} keeps serving"
            ));
        }
        let mine = listeners::socket_inodes(new.id()).unwrap_or_default();
        if listeners::unix_listeners(sock)
            .iter()
            .any(|i| mine.contains(i))
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            stop(new);
            return Err(format!(
                "the new process did not listen on {sock}; process {old} keeps serving"
            ));
        }
        std::thread::sleep(POLL);
    }
}

/// Step 3: until `serve -u -d` has taken the sockets and forked.
fn wait_for_hand_over(new: &mut Child, old: u32, deadline: Instant) -> Result<(), String> {
    let status = loop {
        if let Some(status) = new.try_wait().map_err(|e| e.to_string())? {
            break status;
        }
        if Instant::now() > deadline {
            stop(new);
            return Err(format!(
                "the new process did not take the sockets over from {old}"
            ));
        }
        std::thread::sleep(POLL);
    };
    if !status.success() {
        return Err(format!(
            "the new process failed ({status}) while taking the sockets over from {old}"
        ));
    }
    Ok(())
}

/// Step 4: the running process the PID file names once it is not `old`.
fn wait_for_new_pid(pid_file: &str, old: u32, deadline: Instant) -> Result<u32, String> {
    loop {
        match running_pid(pid_file) {
            Some(p) if p != old => return Ok(p),
            _ if Instant::now() > deadline => {
                return Err(format!("{pid_file} does not name a new running process"))
            }
            _ => std::thread::sleep(POLL),
        }
    }
}

/// Step 5: until `daemon` answers its own `/healthz` with 200.
fn wait_until_ready(admin: SocketAddr, daemon: u32, deadline: Instant) -> Result<(), String> {
    let mut last = String::from("no answer");
    loop {
        if !alive(daemon) {
            return Err(format!(
                "the new process {daemon} exited before it was ready ({last}); see its log"
            ));
        }
        match health(admin) {
            Some((200, Some(p))) if p == daemon => return Ok(()),
            Some((status, Some(p))) if p == daemon => last = format!("/healthz {status}"),
            _ => {}
        }
        if Instant::now() > deadline {
            return Err(format!(
                "the new process {daemon} is not ready ({last}) after {RELOAD_WITHIN:?}"
            ));
        }
        std::thread::sleep(POLL);
    }
}

fn send_quit(pid: u32) -> Result<(), String> {
    let target = libc::pid_t::try_from(pid).map_err(|e| e.to_string())?;
    // SAFETY: kill(2) has no memory effects; `target` is a positive PID.
    if unsafe { libc::kill(target, libc::SIGQUIT) } == 0 {
        Ok(())
    } else {
        Err(format!(
            "cannot signal process {pid}: {}",
            std::io::Error::last_os_error()
        ))
    }
}

/// End a new process that never took over (it holds nothing yet).
fn stop(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Where to reach a listener bound to `addr` from this host.
fn loopback(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => (Ipv4Addr::LOCALHOST, addr.port()).into(),
        IpAddr::V6(ip) if ip.is_unspecified() => (Ipv6Addr::LOCALHOST, addr.port()).into(),
        _ => addr,
    }
}

/// `GET /healthz` on a fresh connection: the status and the answering PID.
fn health(addr: SocketAddr) -> Option<(u16, Option<u32>)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: tollgate\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut answer = Vec::new();
    s.read_to_end(&mut answer).ok()?;
    let text = String::from_utf8_lossy(&answer);
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body: serde_json::Value = serde_json::from_str(text.split("\r\n\r\n").nth(1)?).ok()?;
    let pid = body["pid"].as_u64().and_then(|p| u32::try_from(p).ok());
    Some((status, pid))
}
