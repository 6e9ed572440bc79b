//! Redis Cluster and Sentinel setups for the tests: real `redis-server`
//! processes on free ports (a sentinel is `redis-server --sentinel`), made
//! into a cluster with `redis-cli --cluster create`, polled until ready and
//! stopped by PID when dropped.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::free_port;

/// One process, killed by its PID when dropped.
pub struct Proc {
    child: Option<Child>,
    pub port: u16,
}

impl Proc {
    fn spawn(args: &[String], port: u16) -> Proc {
        Proc::spawn_ready(args, port, &[])
    }

    /// Start, then poll with `redis-cli [cli_args] -p PORT PING`.
    fn spawn_ready(args: &[String], port: u16, cli_args: &[&str]) -> Proc {
        let child = Command::new("redis-server")
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (.ci/test installs it)");
        let p = Proc {
            child: Some(child),
            port,
        };
        let ping: Vec<&str> = cli_args.iter().copied().chain(["PING"]).collect();
        wait_for(&format!("redis on {port}"), || {
            cli(port, &ping).is_some_and(|o| o.trim() == "PONG")
        });
        p
    }

    /// Stall it (SIGSTOP): connections stay open, commands wait unread.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Let a paused process go on (SIGCONT); it runs what waited.
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, sig: &str) {
        let child = self.child.as_ref().expect("the process is running");
        super::signal(child.id(), sig);
    }

    /// Kill it now (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `redis-cli -p PORT ARGS…`'s output, `None` if it failed.
pub fn cli(port: u16, args: &[&str]) -> Option<String> {
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether the Redis on `port` holds `name`.
pub fn holds(port: u16, name: &str) -> bool {
    cli(port, &["EXISTS", name]).is_some_and(|o| o.trim() == "1")
}

/// Every name the Redis on `port` holds, by SCAN (`redis-cli --scan`).
pub fn scan(port: u16) -> Vec<String> {
    cli(port, &["--scan"])
        .expect("redis-cli --scan")
        .lines()
        .map(str::to_string)
        .collect()
}

/// The Redis name of a key's hash under `prefix`.
pub fn key_name(prefix: &str, key: &str) -> String {
    format!("{prefix}key:{{{}}}", tollgate::key::KeyHash::of(key).hex())
}

/// A key's `credits` field on the Redis at `port`.
pub fn credits_on(port: u16, name: &str) -> u64 {
    let out = cli(port, &["HGET", name, "credits"]).unwrap_or_default();
    out.trim()
        .parse()
        .unwrap_or_else(|_| panic!("credits of {name} on {port}: {out:?}"))
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn server_args(port: u16, dir: &TempDir, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = [
        "--port",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        dir.path().to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

/// A TLS server's certificate, key and CA files (the CA also tells
/// `redis-cli` whom to trust).
pub struct TlsFiles<'a> {
    pub cert: &'a str,
    pub key: &'a str,
    pub ca: &'a str,
}

impl TlsFiles<'_> {
    /// Make a server's arguments (from [`server_args`]) speak only TLS on
    /// `port`, replication included.
    fn tls_only(&self, args: &mut Vec<String>, port: u16) {
        args[1] = "0".into(); // --port 0: no plain port
        let p = port.to_string();
        args.extend(
            [
                "--tls-port",
                &p,
                "--tls-replication",
                "yes",
                "--tls-cert-file",
                self.cert,
                "--tls-key-file",
                self.key,
                "--tls-ca-cert-file",
                self.ca,
                "--tls-auth-clients",
                "no",
            ]
            .map(String::from),
        );
    }

    /// What `redis-cli` needs to talk to such a server.
    fn cli_args(&self) -> Vec<&str> {
        vec!["--tls", "--cacert", self.ca]
    }
}

/// The arguments `redis-cli` needs for `tls` (none without it).
fn cli_args<'a>(tls: &'a Option<TlsFiles>) -> Vec<&'a str> {
    tls.as_ref().map_or_else(Vec::new, TlsFiles::cli_args)
}

/// `store.redis_ca` for a TLS setup with this CA file, else nothing.
fn ca_yaml(ca: &Option<String>) -> String {
    match ca {
        Some(ca) => format!("  redis_ca: \"{ca}\"\n"),
        None => String::new(),
    }
}

/// A Redis that speaks only TLS with these files; clients are not asked
/// for certificates.
pub fn tls_redis(dir: &TempDir, files: &TlsFiles) -> Proc {
    let port = free_port();
    let mut args = server_args(port, dir, &[]);
    files.tls_only(&mut args, port);
    Proc::spawn_ready(&args, port, &files.cli_args())
}

/// Three masters, no replicas.
pub struct Cluster {
    pub nodes: Vec<Proc>,
    /// `rediss://` (TLS only, with this CA file).
    tls_ca: Option<String>,
    _dir: TempDir,
}

impl Cluster {
    pub fn start() -> Cluster {
        Cluster::start_with(None)
    }

    /// Every node speaks only TLS, the cluster bus too.
    pub fn start_tls(files: TlsFiles) -> Cluster {
        Cluster::start_with(Some(files))
    }

    fn start_with(tls: Option<TlsFiles>) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let cli_tls = cli_args(&tls);
        let nodes: Vec<Proc> = (0..3)
            .map(|i| {
                let port = free_port();
                let conf = format!("nodes-{i}.conf");
                let mut args = server_args(
                    port,
                    &dir,
                    &["--cluster-enabled", "yes", "--cluster-config-file", &conf],
                );
                if let Some(f) = &tls {
                    f.tls_only(&mut args, port);
                    args.extend(["--tls-cluster".into(), "yes".into()]);
                }
                Proc::spawn_ready(&args, port, &cli_tls)
            })
            .collect();
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let out = Command::new("redis-cli")
            .args(&cli_tls)
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "redis-cli --cluster create: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let info: Vec<&str> = cli_tls.iter().copied().chain(["CLUSTER", "INFO"]).collect();
        for n in &nodes {
            wait_for("cluster_state:ok", || {
                cli(n.port, &info).is_some_and(|o| o.contains("cluster_state:ok"))
            });
        }
        Cluster {
            nodes,
            tls_ca: tls.map(|f| f.ca.to_string()),
            _dir: dir,
        }
    }

    /// The `store:` YAML for it.
    pub fn store_yaml(&self) -> String {
        self.store_yaml_timeout(2000)
    }

    /// The `store:` YAML for it, with this `timeout_ms`.
    pub fn store_yaml_timeout(&self, timeout_ms: u64) -> String {
        let urls: Vec<String> = self
            .nodes
            .iter()
            .map(|n| match self.tls_ca {
                Some(_) => format!("\"rediss://localhost:{}\"", n.port),
                None => format!("\"redis://127.0.0.1:{}\"", n.port),
            })
            .collect();
        let ca = ca_yaml(&self.tls_ca);
        format!(
            "store:\n  redis_cluster: [{}]\n  timeout_ms: {timeout_ms}\n{ca}",
            urls.join(", ")
        )
    }

    /// Which of the masters holds `name` (it must exist).
    pub fn holder(&self, name: &str) -> usize {
        self.nodes
            .iter()
            .position(|n| holds(n.port, name))
            .unwrap_or_else(|| panic!("no master holds {name}"))
    }

    /// How many keys each master holds.
    pub fn sizes(&self) -> Vec<usize> {
        self.nodes
            .iter()
            .map(|n| {
                cli(n.port, &["DBSIZE"])
                    .and_then(|o| o.trim().parse().ok())
                    .unwrap_or(0)
            })
            .collect()
    }
}

/// `store.timeout_ms` of [`Sentinels::store_yaml`].
pub const SENTINEL_TIMEOUT_MS: u64 = 500;

/// A master, its replica and three sentinels watching it as `tollgate`.
pub struct Sentinels {
    pub master: Proc,
    pub replica: Proc,
    pub sentinels: Vec<Proc>,
    /// `rediss://` sentinels, with this CA file.
    tls_ca: Option<String>,
    _dir: TempDir,
}

impl Sentinels {
    pub fn start() -> Sentinels {
        Sentinels::start_with(None)
    }

    /// Master, replica and sentinels all speak only TLS.
    pub fn start_tls(files: TlsFiles) -> Sentinels {
        Sentinels::start_with(Some(files))
    }

    fn start_with(tls: Option<TlsFiles>) -> Sentinels {
        let dir = tempfile::tempdir().unwrap();
        let cli_tls = cli_args(&tls);
        let server = |port: u16, extra: &[&str]| {
            let mut args = server_args(port, &dir, extra);
            if let Some(f) = &tls {
                f.tls_only(&mut args, port);
            }
            Proc::spawn_ready(&args, port, &cli_tls)
        };
        let mport = free_port();
        let master = server(mport, &[]);
        let rport = free_port();
        let mp = mport.to_string();
        let replica = server(rport, &["--replicaof", "127.0.0.1", &mp]);
        let info: Vec<&str> = cli_tls
            .iter()
            .copied()
            .chain(["INFO", "replication"])
            .collect();
        wait_for("the replica to sync", || {
            cli(rport, &info).is_some_and(|o| o.contains("master_link_status:up"))
        });
        let sentinels = (0..3)
            .map(|i| {
                let port = free_port();
                let conf = dir.path().join(format!("sentinel-{i}.conf"));
                let listen = match &tls {
                    None => format!("port {port}\n"),
                    Some(f) => format!(
                        "port 0\ntls-port {port}\ntls-replication yes\ntls-cert-file {}\n\
                         tls-key-file {}\ntls-ca-cert-file {}\ntls-auth-clients no\n",
                        f.cert, f.key, f.ca
                    ),
                };
                std::fs::write(
                    &conf,
                    format!(
                        "{listen}bind 127.0.0.1\nsentinel monitor tollgate 127.0.0.1 {mport} 2\n\
                         sentinel down-after-milliseconds tollgate 500\n\
                         sentinel failover-timeout tollgate 5000\n"
                    ),
                )
                .unwrap();
                Proc::spawn_ready(
                    &[conf.display().to_string(), "--sentinel".into()],
                    port,
                    &cli_tls,
                )
            })
            .collect();
        Sentinels {
            master,
            replica,
            sentinels,
            tls_ca: tls.map(|f| f.ca.to_string()),
            _dir: dir,
        }
    }

    pub fn store_yaml(&self) -> String {
        let s: Vec<String> = self
            .sentinels
            .iter()
            .map(|p| match self.tls_ca {
                Some(_) => format!("\"rediss://127.0.0.1:{}\"", p.port),
                None => format!("\"127.0.0.1:{}\"", p.port),
            })
            .collect();
        let ca = ca_yaml(&self.tls_ca);
        format!(
            "store:\n  redis_sentinel: {{master_name: tollgate, sentinels: [{}], db: 0}}\n  timeout_ms: {SENTINEL_TIMEOUT_MS}\n{ca}",
            s.join(", ")
        )
    }

    /// The master the sentinels name now.
    pub fn master_port(&self) -> Option<u16> {
        let out = cli(
            self.sentinels[0].port,
            &["SENTINEL", "get-master-addr-by-name", "tollgate"],
        )?;
        out.lines().nth(1)?.trim().parse().ok()
    }
}
