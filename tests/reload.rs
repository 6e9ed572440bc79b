//! Reloads as systemd runs them: the unit's own `ExecReload=` lines, read
//! from `systemd/tollgate.service` and run in order with the built binary,
//! a test config and the daemon's PID for `$MAINPID` (systemd itself does
//! not run here). Under load no request fails and credits equal answers,
//! also for ten reloads a second apart; a reload that cannot succeed fails
//! visibly and leaves the running process serving; a SIGQUIT with no process
//! waiting for the sockets is refused; a process that cannot bind a listener
//! exits non-zero at once; a renewed TLS certificate is served after a
//! reload under TLS load that loses nothing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::pki;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CREDITS: u64 = 1_000_000;

struct Ports {
    listen: u16,
    admin: u16,
}

impl Ports {
    fn free() -> Ports {
        Ports {
            listen: free_port(),
            admin: free_port(),
        }
    }
}

/// A request to the listener is answered without `Connection: close`, which
/// the process adds once a hand-over or shutdown begins: it has not begun to
/// drain.
async fn serves_without_draining(ports: &Ports) {
    let r = client()
        .get(format!("http://127.0.0.1:{}/api/x", ports.listen))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        r.headers().get("connection").is_none_or(|v| v != "close"),
        "the process began to drain"
    );
}

fn conf(dir: &Path, ports: &Ports, backend: &Origin, store: &str) -> String {
    conf_listening(dir, ports, backend, store, "")
}

/// [`conf`] with more `listen` entries (`, {addr: …, tls: …}`).
fn conf_listening(
    dir: &Path,
    ports: &Ports,
    backend: &Origin,
    store: &str,
    more_listen: &str,
) -> String {
    let d = dir.display();
    format!(
        "server:\n  threads: 2\n  pid_file: {d}/tollgate.pid\n  upgrade_sock: {d}/upgrade.sock\n  \
         error_log: {d}/error.log\n  grace_period_seconds: 1\n  graceful_shutdown_timeout_seconds: 2\n\
         listen: [\"127.0.0.1:{}\"{more_listen}]\nadmin_listen: \"127.0.0.1:{}\"\n{store}\naccess_log: off\n\
         routes:\n  - {{name: t, prefix: /api/, backends: [\"{}\"]}}\n",
        ports.listen,
        ports.admin,
        backend.url()
    )
}

/// The daemons' log lines above INFO (the last 40), to say why a request
/// failed.
fn warnings(dir: &Path) -> String {
    let log = std::fs::read_to_string(dir.join("error.log")).unwrap_or_default();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| !l.contains(" INFO ") && !l.contains(" DEBUG "))
        .collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// The PID the PID file names, if it names one yet.
fn pid_file(dir: &Path) -> Option<i32> {
    std::fs::read_to_string(dir.join("tollgate.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// `serve -d` returns right after it forks; the daemon writes the PID file a
/// moment later. Wait (bounded) until it names a process other than `old`.
async fn wait_pid(dir: &Path, old: Option<i32>) -> i32 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match pid_file(dir) {
            Some(pid) if Some(pid) != old => return pid,
            other => assert!(
                Instant::now() < deadline,
                "the pid file still says {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Whether a process runs (a zombie does not count).
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z'),
        Err(_) => false,
    }
}

fn signal(sig: &str, pid: i32) {
    let st = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success(), "kill {sig} {pid}");
}

/// Stops every daemon we started when the test ends, whatever happened.
struct Daemons(Vec<i32>);

impl Drop for Daemons {
    fn drop(&mut self) {
        for pid in &self.0 {
            if alive(*pid) {
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
            }
        }
    }
}

/// The unit's `ExecReload=` lines, in order.
fn unit_reload_lines() -> Vec<String> {
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/systemd/tollgate.service"
    ))
    .unwrap();
    let lines: Vec<String> = unit
        .lines()
        .filter_map(|l| l.strip_prefix("ExecReload="))
        .map(str::to_string)
        .collect();
    assert!(!lines.is_empty(), "the unit has no ExecReload");
    lines
}

/// Run the unit's `ExecReload=` lines as systemd would (in order, stopping
/// at the first that fails), with this binary, `conf` and `$MAINPID`.
/// Returns the failing line's exit code (0 when all passed) and its stderr.
fn exec_reload(conf: &Path, main_pid: i32) -> (i32, String) {
    exec_reload_out(conf, main_pid).0
}

/// [`exec_reload`], also returning the lines' stdout.
fn exec_reload_out(conf: &Path, main_pid: i32) -> ((i32, String), String) {
    let mut stdout = String::new();
    for line in unit_reload_lines() {
        let line = line
            .replace("/usr/local/bin/tollgate", tollgate_bin().to_str().unwrap())
            .replace("/etc/tollgate/tollgate.yaml", conf.to_str().unwrap())
            .replace("$MAINPID", &main_pid.to_string());
        let mut words = line.split_whitespace();
        let out = Command::new(words.next().unwrap())
            .args(words)
            .output()
            .unwrap();
        stdout.push_str(&String::from_utf8_lossy(&out.stdout));
        if !out.status.success() {
            let failed = (
                out.status.code().unwrap_or(-1),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            );
            return (failed, stdout);
        }
    }
    ((0, String::new()), stdout)
}

/// Poll the admin listener until it answers 200.
async fn wait_ready(ports: &Ports) {
    let url = format!("http://127.0.0.1:{}/healthz", ports.admin);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !reqwest::get(&url).await.is_ok_and(|r| r.status() == 200) {
        assert!(Instant::now() < deadline, "daemon not ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Bound on one load request: a hang counts as a failure, it never stalls the test.
const REQUEST_LIMIT: Duration = Duration::from_secs(5);

/// One request on a fresh connection; the body's "from", or an error.
async fn fresh_request(port: u16, key: &str) -> Result<String, String> {
    match tokio::time::timeout(REQUEST_LIMIT, fresh_request_inner(port, key)).await {
        Ok(r) => r,
        Err(_) => Err("no answer within 5 s".into()),
    }
}

async fn fresh_request_inner(port: u16, key: &str) -> Result<String, String> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| e.to_string())?;
    let req =
        format!("GET /api/x HTTP/1.1\r\nHost: t\r\nX-API-Key: {key}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out);
    let (status, body) = status_and_json(&text);
    match status {
        200 => Ok(body["from"].as_str().unwrap_or("?").to_string()),
        0 if out.is_empty() => Err("connection closed without an answer byte".into()),
        other => Err(format!("HTTP {other}: {text}")),
    }
}

/// A client's answer: the body's "from" on a 200, else what went wrong.
async fn from_of(sent: reqwest::Result<reqwest::Response>) -> Result<String, String> {
    match sent {
        Ok(r) if r.status() == 200 => {
            let v: serde_json::Value = r.json().await.unwrap_or_default();
            Ok(v["from"].as_str().unwrap_or("?").to_string())
        }
        Ok(r) => Err(format!("HTTP {} ({:?})", r.status(), r.version())),
        Err(e) => Err(format!("{e:?}")),
    }
}

#[derive(Default)]
struct Tally {
    ok: Vec<String>,
    /// (when, since the load began; what)
    failed: Vec<(Duration, String)>,
}

impl Tally {
    fn record(&mut self, began: Instant, result: Result<String, String>) {
        match result {
            Ok(from) => self.ok.push(from),
            Err(e) => self.failed.push((began.elapsed(), e)),
        }
    }
}

/// `clients` clients until `stop`: the first half on keep-alive connections
/// (reqwest's pool), the rest opening a connection per request.
fn start_load(
    clients: usize,
    port: u16,
    key: &'static str,
    stop: Arc<AtomicBool>,
    tally: Arc<Mutex<Tally>>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let began = Instant::now();
    (0..clients)
        .map(|i| {
            let (stop, tally) = (stop.clone(), tally.clone());
            tokio::spawn(async move {
                let client = reqwest::Client::builder()
                    .timeout(REQUEST_LIMIT)
                    .build()
                    .unwrap();
                while !stop.load(Ordering::Relaxed) {
                    let result = if i < clients / 2 {
                        let url = format!("http://127.0.0.1:{port}/api/x");
                        from_of(client.get(url).header("X-API-Key", key).send().await).await
                    } else {
                        fresh_request(port, key).await
                    };
                    tally.lock().unwrap().record(began, result);
                }
            })
        })
        .collect()
}

/// The key's balance in Redis.
async fn balance(redis: &RedisServer) -> u64 {
    let dump = redis.dump().await;
    let (_, fields) = dump
        .iter()
        // The key's hash itself, `tollgate:key:{<sha256>}`, not the names
        // beside it (`…:op:…`, `…:leases`, `…:wanted`).
        .find(|(k, _)| k.starts_with("tollgate:key:") && k.ends_with('}'))
        .unwrap();
    fields
        .iter()
        .position(|f| f == "credits")
        .map(|i| fields[i + 1].parse().unwrap())
        .unwrap()
}

/// Ten reloads with the unit's `ExecReload`, one second apart, alternating
/// between two configs (backend a, backend b), under 32 clients, in daemon
/// mode. Before `TCP_DEFER_ACCEPT`, a process ending its accept window
/// dropped the connections it had accepted before their request arrived.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_reloads_a_second_apart_under_load_lose_nothing() {
    reloads_under_load(10, "").await;
}

/// The same with credit leases: each old process gives its unspent credits
/// back as it stops, and once the last one has stopped the balance is
/// exactly the start less the answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reloads_with_leases_under_load_lose_nothing() {
    reloads_under_load(4, "\n  leases: {max_credits: 200, ttl_seconds: 30}").await;
}

async fn reloads_under_load(reloads: usize, leases: &str) {
    const KEY_: &str = "reload-key";
    let redis = RedisServer::start();
    import_keys(&redis, &format!("keys:\n  - {{key: \"{KEY_}\", name: r, credits: {CREDITS}, rate_per_second: 1000000}}\n"));
    let a = Origin::json("a", true, 20).await;
    let b = Origin::json("b", true, 20).await;
    let dir = tempfile::tempdir().unwrap();
    let ports = Ports::free();
    // A loaded CI machine can stall Redis past the 250 ms default: a 503 then
    // would be the store, not the reload, that this test is about.
    let store = format!(
        "store:\n  redis_url: {}\n  timeout_ms: 5000{leases}",
        redis.url()
    );
    let confs = [
        write(dir.path(), "a.yaml", &conf(dir.path(), &ports, &a, &store)),
        write(dir.path(), "b.yaml", &conf(dir.path(), &ports, &b, &store)),
    ];
    let mut daemons = Daemons(Vec::new());

    // ExecStartPre, ExecStart.
    assert_eq!(tollgate(&["check"], &confs[0]).0, 0);
    let (code, _, err) = tollgate(&["serve", "-d"], &confs[0]);
    assert_eq!(code, 0, "{err}");
    let mut pid = wait_pid(dir.path(), None).await;
    daemons.0.push(pid);
    wait_ready(&ports).await;

    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Mutex::new(Tally::default()));
    let load = start_load(32, ports.listen, KEY_, stop.clone(), tally.clone());
    let count_from = |who: &str| {
        tally
            .lock()
            .unwrap()
            .ok
            .iter()
            .filter(|f| *f == who)
            .count()
    };
    wait_until(
        "traffic on the first process",
        Duration::from_secs(10),
        || count_from("a") >= 50,
    )
    .await;

    let began = Instant::now();
    let mut took = Vec::new();
    for i in 0..reloads {
        let conf = &confs[(i + 1) % 2];
        let t = Instant::now();
        let ((code, err), out) = exec_reload_out(conf, pid);
        assert_eq!(code, 0, "reload {i}: {err}");
        took.push(t.elapsed());
        eprint!("{out}");
        // The reload returns once the new process serves; the PID file names it.
        let new = pid_file(dir.path()).unwrap();
        assert_ne!(new, pid, "reload {i} did not change the PID");
        daemons.0.push(new);
        pid = new;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let reloads_done = began.elapsed();
    eprintln!("reloads took {took:?}, {reloads_done:?} in all");
    // Every older process finishes and exits; traffic goes on meanwhile.
    for old in &daemons.0[..daemons.0.len() - 1] {
        wait_until("an old process to exit", Duration::from_secs(30), || {
            !alive(*old)
        })
        .await;
    }
    // Reload i ran confs[(i + 1) % 2]: the last one (i = 9) backend a.
    let last_from = if reloads.is_multiple_of(2) { "a" } else { "b" };
    let before = count_from(last_from);
    wait_until("traffic after the reloads", Duration::from_secs(10), || {
        count_from(last_from) >= before + 50
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    for t in load {
        t.await.unwrap();
    }

    let (served, failed) = {
        let t = tally.lock().unwrap();
        (t.ok.len() as u64, t.failed.clone())
    };
    assert!(
        failed.is_empty(),
        "{} of {served} requests failed (reloads took {took:?}): {:?}\nthe daemons' warnings:\n{}",
        failed.len(),
        &failed[..failed.len().min(8)],
        warnings(dir.path())
    );
    assert!(count_from("a") > 0 && count_from("b") > 0);
    eprintln!(
        "{reloads} reloads in {reloads_done:?} (each {took:?}): {served} requests, 0 failed ({} from a, {} from b)",
        count_from("a"),
        count_from("b")
    );
    if leases.is_empty() {
        assert_eq!(
            CREDITS - balance(&redis).await,
            served,
            "credits charged != answers"
        );
    }
    assert!(alive(pid));
    signal("-TERM", pid);
    wait_until("the last process to stop", Duration::from_secs(30), || {
        !alive(pid)
    })
    .await;
    // With leases, the last process gave its lease back as it stopped.
    assert_eq!(
        CREDITS - balance(&redis).await,
        served,
        "credits charged != answers"
    );
}

/// A gateway on the embedded store, as a daemon; returns its PID.
async fn embedded_daemon(dir: &Path, ports: &Ports, backend: &Origin) -> (PathBuf, i32) {
    let store = format!("store:\n  keys_file: {}", dir.join("keys.yaml").display());
    write(dir, "keys.yaml", &default_keys());
    let good = write(dir, "good.yaml", &conf(dir, ports, backend, &store));
    let (code, _, err) = tollgate(&["serve", "-d"], &good);
    assert_eq!(code, 0, "{err}");
    let pid = wait_pid(dir, None).await;
    wait_ready(ports).await;
    (good, pid)
}

/// `/healthz` of whoever answers: (status, pid).
async fn health(ports: &Ports) -> (u16, i64) {
    let r = reqwest::get(format!("http://127.0.0.1:{}/healthz", ports.admin))
        .await
        .unwrap();
    let status = r.status().as_u16();
    let body: serde_json::Value = r.json().await.unwrap();
    (status, body["pid"].as_i64().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_with_a_broken_config_is_refused() {
    let a = Origin::json("a", true, 0).await;
    let dir = tempfile::tempdir().unwrap();
    let ports = Ports::free();
    let (good, pid) = embedded_daemon(dir.path(), &ports, &a).await;
    let _daemons = Daemons(vec![pid]);
    let broken = write(
        dir.path(),
        "broken.yaml",
        &std::fs::read_to_string(&good)
            .unwrap()
            .replace("name: t,", "name: t, strategy: fastest,"),
    );

    let (code, err) = exec_reload(&broken, pid);
    assert_eq!(code, 1);
    assert!(err.contains("routes[0].strategy"), "{err}");
    assert!(alive(pid));
    assert_eq!(pid_file(dir.path()), Some(pid));
    assert_eq!(fresh_request(ports.listen, KEY).await, Ok("a".to_string()));
    stop(pid).await;
}

/// A reload to a config with a listener on a port someone else holds: the
/// reload fails naming the field, the running process is never signalled
/// and keeps serving (before, it was told to go first, and the new process
/// retried 30 s and then lost its proxy service while `/healthz` said 200).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_whose_new_listener_is_taken_fails_and_the_old_process_serves_on() {
    let a = Origin::json("a", true, 0).await;
    let dir = tempfile::tempdir().unwrap();
    let ports = Ports::free();
    let (good, pid) = embedded_daemon(dir.path(), &ports, &a).await;
    let _daemons = Daemons(vec![pid]);
    assert_eq!(health(&ports).await, (200, pid as i64));
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_port = taken.local_addr().unwrap().port();
    let two = write(
        dir.path(),
        "two.yaml",
        &std::fs::read_to_string(&good).unwrap().replace(
            &format!("listen: [\"127.0.0.1:{}\"]", ports.listen),
            &format!(
                "listen: [\"127.0.0.1:{}\", \"127.0.0.1:{taken_port}\"]",
                ports.listen
            ),
        ),
    );
    assert_eq!(tollgate(&["check"], &two).0, 0, "the config itself is fine");

    let t = Instant::now();
    let (code, err) = exec_reload(&two, pid);
    assert_eq!(code, 1, "{err}");
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "took {:?}",
        t.elapsed()
    );
    assert!(
        err.contains(&format!(
            "listen[1]: cannot listen on 127.0.0.1:{taken_port}"
        )),
        "{err}"
    );
    assert!(err.contains(&format!("{pid} keeps serving")), "{err}");
    // The old process was not asked to go.
    for _ in 0..20 {
        serves_without_draining(&ports).await;
    }
    assert_eq!(pid_file(dir.path()), Some(pid));
    assert_eq!(health(&ports).await, (200, pid as i64));
    assert!(!std::fs::read_to_string(dir.path().join("error.log"))
        .unwrap()
        .contains("SIGQUIT"));
    drop(taken);
    stop(pid).await;
}

/// `kill -QUIT` with no new process waiting (the unit's old reload order, or
/// a hand-run signal) used to start a hand-over to nobody: the process
/// drained and exited 0 after 11 s, which `Restart=on-failure` ignores.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigquit_with_no_process_waiting_is_refused_and_the_process_serves_on() {
    let a = Origin::json("a", true, 0).await;
    let dir = tempfile::tempdir().unwrap();
    let ports = Ports::free();
    let (_, pid) = embedded_daemon(dir.path(), &ports, &a).await;
    let _daemons = Daemons(vec![pid]);
    signal("-QUIT", pid);
    let log = dir.path().join("error.log");
    wait_until("the refusal in the log", Duration::from_secs(10), || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("SIGQUIT, but no new process waits on")
    })
    .await;
    serves_without_draining(&ports).await;
    assert_eq!(health(&ports).await, (200, pid as i64));
    stop(pid).await;
}

/// A listener that cannot be bound ends the process with status 1 at once,
/// naming the address (Pingora alone retries 30 s, then loses the proxy
/// service in a panicked thread while the process and `/healthz` live on).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_that_cannot_bind_a_listener_exits_non_zero() {
    let a = Origin::json("a", true, 0).await;
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let ports = Ports {
        listen: taken.local_addr().unwrap().port(),
        admin: free_port(),
    };
    let store = format!(
        "store:\n  keys_file: {}",
        dir.path().join("keys.yaml").display()
    );
    write(dir.path(), "keys.yaml", &default_keys());
    let conf = write(
        dir.path(),
        "t.yaml",
        &conf(dir.path(), &ports, &a, &store).replace("  error_log: ", "  # error_log: "),
    );
    let log = dir.path().join("serve.log");
    let mut serve = Command::new(tollgate_bin())
        .args(["serve", "-c"])
        .arg(&conf)
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let t = Instant::now();
    let status = loop {
        if let Some(status) = serve.try_wait().unwrap() {
            break Some(status);
        }
        if t.elapsed() > Duration::from_secs(10) {
            let _ = serve.kill();
            let _ = serve.wait();
            break None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let err = std::fs::read_to_string(&log).unwrap();
    assert_eq!(status.and_then(|s| s.code()), Some(1), "{err}");
    assert!(
        err.contains(&format!("cannot listen on 127.0.0.1:{}", ports.listen)),
        "{err}"
    );
    drop(taken);
}

/// SIGTERM `pid` and wait (bounded) until it has exited.
async fn stop(pid: i32) {
    signal("-TERM", pid);
    wait_until("the process to stop", Duration::from_secs(30), || {
        !alive(pid)
    })
    .await;
}

/// TLS clients until `stop`, by thirds: keep-alive HTTP/1.1, HTTP/2 (one
/// connection, streams at once), and a new connection per request.
fn start_tls_load(
    clients: usize,
    url: String,
    key: &'static str,
    pki: &pki::Pki,
    stop: Arc<AtomicBool>,
    tally: Arc<Mutex<Tally>>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let began = Instant::now();
    let h1 = pki::client(pki, false);
    let h2 = pki::client(pki, true);
    let fresh = pki::builder(pki)
        .http1_only()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    (0..clients)
        .map(|i| {
            let client = [&h1, &h2, &fresh][i % 3].clone();
            let (stop, tally, url) = (stop.clone(), tally.clone(), url.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let result = from_of(client.get(&url).header("X-API-Key", key).send().await)
                        .await
                        .map_err(|e| format!("client {i}: {e}"));
                    tally.lock().unwrap().record(began, result);
                }
            })
        })
        .collect()
}

/// A renewed certificate written over the old files is served after a
/// reload (an expired one fails the reload first); TLS clients on HTTP/1.1, HTTP/2 and new connections lose nothing
/// meanwhile, and credits equal answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reload_serves_a_renewed_certificate_under_tls_load_losing_nothing() {
    const KEY_: &str = "tls-reload-key";
    let redis = RedisServer::start();
    import_keys(&redis, &format!("keys:\n  - {{key: \"{KEY_}\", name: r, credits: {CREDITS}, rate_per_second: 1000000}}\n"));
    let a = Origin::json("a", true, 10).await;
    let dir = tempfile::tempdir().unwrap();
    let pki = pki::Pki::new(dir.path());
    let live = pki.leaf("live", 1, 30);
    let ports = Ports::free();
    let tls_port = free_port();
    let store = format!("store:\n  redis_url: {}\n  timeout_ms: 5000", redis.url());
    let tls = format!(
        ", {{addr: \"127.0.0.1:{tls_port}\", tls: {{cert: \"{}\", key: \"{}\"}}}}",
        live.cert.display(),
        live.key.display()
    );
    let conf = write(
        dir.path(),
        "tls.yaml",
        &conf_listening(dir.path(), &ports, &a, &store, &tls),
    );
    let mut daemons = Daemons(Vec::new());
    let (code, _, err) = tollgate(&["serve", "-d"], &conf);
    assert_eq!(code, 0, "{err}");
    let pid = wait_pid(dir.path(), None).await;
    daemons.0.push(pid);
    wait_ready(&ports).await;

    let url = format!("https://localhost:{tls_port}/api/x");
    let serial = || async {
        let r = pki::client(&pki, true)
            .get(&url)
            .header("X-API-Key", KEY_)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        pki::peer_serial(&r)
    };
    assert_eq!(serial().await, 1);

    let halt = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Mutex::new(Tally::default()));
    let load = start_tls_load(12, url.clone(), KEY_, &pki, halt.clone(), tally.clone());
    let served = || tally.lock().unwrap().ok.len();
    wait_until(
        "TLS traffic on the first process",
        Duration::from_secs(10),
        || served() >= 50,
    )
    .await;

    // An expired renewal fails the reload; the process serves on.
    pki.leaf("live", 9, -1);
    let (code, err) = exec_reload(&conf, pid);
    assert!(
        code != 0 && err.contains("listen[1].tls.cert"),
        "{code} {err}"
    );
    assert_eq!(pid_file(dir.path()), Some(pid));
    // Renewal: new files where the old ones were, then the unit's reload.
    let renewed = pki.leaf("live", 2, 90);
    assert_eq!(renewed.cert, live.cert);
    let (code, err) = exec_reload(&conf, pid);
    assert_eq!(code, 0, "{err}");
    let new = pid_file(dir.path()).unwrap();
    assert_ne!(new, pid);
    daemons.0.push(new);
    // The old process accepts on the shared socket until its grace period
    // ends; once it has gone, every new connection meets the new process.
    wait_until("the old process to exit", Duration::from_secs(30), || {
        !alive(pid)
    })
    .await;
    assert_eq!(
        serial().await,
        2,
        "a new connection still sees the old certificate"
    );
    let before = served();
    wait_until("traffic after the reload", Duration::from_secs(10), || {
        served() >= before + 50
    })
    .await;
    halt.store(true, Ordering::Relaxed);
    for t in load {
        t.await.unwrap();
    }
    let (served, failed) = {
        let t = tally.lock().unwrap();
        (t.ok.len() as u64, t.failed.clone())
    };
    assert!(
        failed.is_empty(),
        "{} of {served} TLS requests failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(8)]
    );
    // The two serial probes were answered and charged too.
    assert_eq!(
        CREDITS - balance(&redis).await,
        served + 2,
        "credits charged != answers"
    );
    eprintln!("TLS reload under load: {served} requests, 0 failed");
    stop(new).await;
}
