//! Operations: the reload sequence of `systemd/tollgate.service`, run with the
//! same commands the unit runs (systemd itself does not run here), under
//! steady load: no request fails, credits equal answers, the new config
//! serves; a broken config is refused and the old process keeps serving. The
//! unit passes `systemd-analyze verify`; the install script stages a tree.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CREDITS: u64 = 1_000_000;

struct Ports {
    listen: u16,
    admin: u16,
}

fn conf(dir: &Path, ports: &Ports, backend: &Origin, store: &str) -> String {
    let d = dir.display();
    format!(
        "server:\n  threads: 2\n  pid_file: {d}/tollgate.pid\n  upgrade_sock: {d}/upgrade.sock\n  \
         error_log: {d}/error.log\n  grace_period_seconds: 1\n  graceful_shutdown_timeout_seconds: 2\n\
         listen: [\"127.0.0.1:{}\"]\nadmin_listen: \"127.0.0.1:{}\"\n{store}\naccess_log: off\n\
         routes:\n  - {{name: t, prefix: /api/, backends: [\"{}\"]}}\n",
        ports.listen,
        ports.admin,
        backend.url()
    )
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

/// Stops a daemon we started when the test ends, whatever happened.
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

/// Poll the admin listener until the daemon serves.
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
        other => Err(format!("HTTP {other}: {text}")),
    }
}

#[derive(Default)]
struct Tally {
    ok: Vec<String>,
    failed: Vec<String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reload_under_load_loses_no_request_and_no_credit() {
    let redis = RedisServer::start();
    let key = "reload-key";
    import_keys(&redis, &format!("keys:\n  - {{key: \"{key}\", name: r, credits: {CREDITS}, rate_per_second: 1000000}}\n"));
    let a = Origin::json("a", true, 20).await;
    let b = Origin::json("b", true, 20).await;
    let dir = tempfile::tempdir().unwrap();
    let ports = Ports {
        listen: free_port(),
        admin: free_port(),
    };
    let store = format!("store:\n  redis_url: {}", redis.url());
    let old_conf = write(
        dir.path(),
        "old.yaml",
        &conf(dir.path(), &ports, &a, &store),
    );
    let new_conf = write(
        dir.path(),
        "new.yaml",
        &conf(dir.path(), &ports, &b, &store),
    );
    let mut daemons = Daemons(Vec::new());

    // ExecStartPre, ExecStart.
    assert_eq!(tollgate(&["check"], &old_conf).0, 0);
    let (code, _, err) = tollgate(&["serve", "-d"], &old_conf);
    assert_eq!(code, 0, "{err}");
    let old_pid = wait_pid(dir.path(), None).await;
    daemons.0.push(old_pid);
    assert!(alive(old_pid));
    // `serve -d` returns once it forked; the daemon listens a moment later.
    wait_ready(&ports).await;

    // Steady load: 3 keep-alive clients and 2 that open a connection per request.
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(std::sync::Mutex::new(Tally::default()));
    let mut load = Vec::new();
    for i in 0..5 {
        let (stop, tally) = (stop.clone(), tally.clone());
        let port = ports.listen;
        load.push(tokio::spawn(async move {
            let client = reqwest::Client::builder()
                .timeout(REQUEST_LIMIT)
                .build()
                .unwrap();
            while !stop.load(Ordering::Relaxed) {
                let result = if i < 3 {
                    match client
                        .get(format!("http://127.0.0.1:{port}/api/x"))
                        .header("X-API-Key", key)
                        .send()
                        .await
                    {
                        Ok(r) if r.status() == 200 => {
                            let v: serde_json::Value = r.json().await.unwrap_or_default();
                            Ok(v["from"].as_str().unwrap_or("?").to_string())
                        }
                        Ok(r) => Err(format!("HTTP {}", r.status())),
                        Err(e) => Err(format!("{e:?}")),
                    }
                } else {
                    fresh_request(port, key).await
                };
                let mut t = tally.lock().unwrap();
                match result {
                    Ok(from) => t.ok.push(from),
                    Err(e) => t.failed.push(e),
                }
            }
        }));
    }
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
        "traffic on the old process",
        Duration::from_secs(10),
        || count_from("a") >= 50,
    )
    .await;

    // ExecReload, in the unit's order: check, SIGQUIT, serve -u -d.
    let reload = Instant::now();
    assert_eq!(tollgate(&["check"], &new_conf).0, 0);
    signal("-QUIT", old_pid);
    let (code, _, err) = tollgate(&["serve", "-u", "-d"], &new_conf);
    assert_eq!(code, 0, "{err}");
    let handed_over = reload.elapsed();
    // The PID file comes to name the new process.
    let new_pid = wait_pid(dir.path(), Some(old_pid)).await;
    daemons.0.push(new_pid);

    // The new process serves the new config; the old one finishes and exits.
    wait_until(
        "answers from the new backend",
        Duration::from_secs(15),
        || count_from("b") >= 50,
    )
    .await;
    wait_until("the old process to exit", Duration::from_secs(30), || {
        !alive(old_pid)
    })
    .await;
    let old_exited = reload.elapsed();
    let b_before = count_from("b");
    wait_until(
        "more traffic after the old process left",
        Duration::from_secs(10),
        || count_from("b") >= b_before + 50,
    )
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
        "{} of {served} requests failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    eprintln!(
        "reload: {served} requests, 0 failed; sockets handed over {handed_over:?} after SIGQUIT; \
         old process exited {old_exited:?} after it ({} answers from the old config, {} from the new)",
        count_from("a"),
        count_from("b")
    );
    // Credits charged equal successful answers.
    let dump = redis.dump().await;
    let (_, fields) = dump
        .iter()
        .find(|(k, _)| k.starts_with("tollgate:key:") && !k.contains(":op:"))
        .unwrap();
    let credits: u64 = fields
        .iter()
        .position(|f| f == "credits")
        .map(|i| fields[i + 1].parse().unwrap())
        .unwrap();
    assert_eq!(CREDITS - credits, served, "credits charged != answers");
    assert!(alive(new_pid));
    signal("-TERM", new_pid);
    wait_until("the new process to stop", Duration::from_secs(30), || {
        !alive(new_pid)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_with_a_broken_config_is_refused() {
    let a = Origin::json("a", true, 0).await;
    let dir = tempfile::tempdir().unwrap();
    let ports = Ports {
        listen: free_port(),
        admin: free_port(),
    };
    let store = format!(
        "store:\n  keys_file: {}",
        dir.path().join("keys.yaml").display()
    );
    write(dir.path(), "keys.yaml", &default_keys());
    let good = write(
        dir.path(),
        "good.yaml",
        &conf(dir.path(), &ports, &a, &store),
    );
    let broken = write(
        dir.path(),
        "broken.yaml",
        &conf(dir.path(), &ports, &a, &store).replace("name: t,", "name: t, strategy: fastest,"),
    );
    let mut daemons = Daemons(Vec::new());
    assert_eq!(tollgate(&["serve", "-d"], &good).0, 0);
    let pid = wait_pid(dir.path(), None).await;
    daemons.0.push(pid);
    wait_ready(&ports).await;

    // ExecReload's first step fails, so systemd runs none of the others.
    let (code, _, err) = tollgate(&["check"], &broken);
    assert_eq!(code, 1);
    assert!(err.contains("routes[0].strategy"), "{err}");
    // Even run by hand, the new process refuses before touching the old one.
    let (code, _, _) = tollgate(&["serve", "-u", "-d"], &broken);
    assert_eq!(code, 1);
    assert!(alive(pid));
    assert_eq!(pid_file(dir.path()), Some(pid));
    let answer = fresh_request(ports.listen, KEY).await;
    assert_eq!(answer, Ok("a".to_string()));
    signal("-TERM", pid);
    wait_until("the process to stop", Duration::from_secs(30), || {
        !alive(pid)
    })
    .await;
}

#[test]
fn the_unit_passes_systemd_analyze_verify() {
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/systemd/tollgate.service"
    ))
    .unwrap();
    for needed in [
        "Type=forking",
        "PIDFile=/run/tollgate/tollgate.pid",
        "ExecStartPre=/usr/local/bin/tollgate check -c /etc/tollgate/tollgate.yaml",
        "ExecStart=/usr/local/bin/tollgate serve -d -c /etc/tollgate/tollgate.yaml",
        "ExecReload=/bin/kill -QUIT $MAINPID",
        "ExecReload=/usr/local/bin/tollgate serve -u -d -c /etc/tollgate/tollgate.yaml",
        "RuntimeDirectory=tollgate",
        "User=tollgate",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
    ] {
        assert!(unit.contains(needed), "unit lacks {needed}");
    }
    // verify checks that the commands exist: point them at the built binary.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tollgate.service");
    std::fs::write(
        &path,
        unit.replace("/usr/local/bin/tollgate", tollgate_bin().to_str().unwrap()),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze must be installed (.ci/test installs systemd)");
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn install_script_stages_binary_config_and_unit() {
    let root = env!("CARGO_MANIFEST_DIR");
    let dest = tempfile::tempdir().unwrap();
    let install = || {
        let mut c = Command::new(format!("{root}/systemd/install.sh"));
        c.env("DESTDIR", dest.path())
            .env("TOLLGATE_BIN", tollgate_bin());
        c
    };
    let out = install().output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let d = dest.path();
    for f in [
        "usr/local/bin/tollgate",
        "etc/systemd/system/tollgate.service",
        "etc/tollgate/tollgate.yaml",
        "etc/tollgate/keys.yaml",
    ] {
        assert!(d.join(f).exists(), "{f} not installed");
    }
    let conf = std::fs::read_to_string(d.join("etc/tollgate/tollgate.yaml")).unwrap();
    assert!(
        conf.contains("pid_file: /run/tollgate/tollgate.pid"),
        "{conf}"
    );
    assert!(
        conf.contains("upgrade_sock: /run/tollgate/upgrade.sock"),
        "{conf}"
    );
    assert!(
        conf.contains("keys_file: /etc/tollgate/keys.yaml"),
        "{conf}"
    );
    // An existing config is kept on reinstall; uninstall keeps it too.
    std::fs::write(d.join("etc/tollgate/tollgate.yaml"), "# mine\n").unwrap();
    let again = install().output().unwrap();
    assert!(again.status.success());
    assert_eq!(
        std::fs::read_to_string(d.join("etc/tollgate/tollgate.yaml")).unwrap(),
        "# mine\n"
    );
    let gone = install().arg("--uninstall").output().unwrap();
    assert!(gone.status.success());
    assert!(!d.join("usr/local/bin/tollgate").exists());
    assert!(!d.join("etc/systemd/system/tollgate.service").exists());
    assert!(d.join("etc/tollgate/tollgate.yaml").exists());
}
