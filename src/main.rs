//! The `tollgate` command: wiring only.

mod demo;
mod generate;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{CommandFactory, Parser, Subcommand};
use pingora::listeners::{L4BufferSettings, ListenerConfig};
use pingora::server::configuration::Opt;
use pingora::server::{RunArgs, Server};

use pingora::services::background::background_service;
use tollgate::config::Config;
use tollgate::connections::ConnectionCounters;
use tollgate::drain::{Draining, PhaseWatch};
use tollgate::keys::KeysCommand;
use tollgate::listeners::{Guarded, Health};
use tollgate::logging::AccessLogService;
use tollgate::metrics::Metrics;
use tollgate::notify::NotifierService;
use tollgate::proxy::Gateway;
use tollgate::store::leases::{LeaseCounters, LeaseKeeper, LeasedStore};
use tollgate::store::memory::MemoryStore;
use tollgate::store::redis::{Maintenance, RedisStore, StoreCounters};
use tollgate::store::{KeyAdmin, SharedCache, Store, UsageLedger};
use tollgate::tls::TlsListeners;
use tollgate::{admin, logging, notify, reload};

/// glibc's malloc took about 12% of the CPU on the race path (profiled with
/// perf, see bench/RESULTS.md); mimalloc's thread-local free lists cost less.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "tollgate",
    version,
    about = "API gateway: keys, credits, rate limits, cache, racing replicas"
)]
struct Cli {
    /// Configuration file (YAML).
    #[arg(short = 'c', long = "conf", global = true, value_name = "FILE")]
    conf: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Serve {
        /// Run in the background (Pingora daemon mode).
        #[arg(short, long)]
        daemon: bool,
        /// Take over the listening sockets of a running instance (graceful upgrade).
        #[arg(short, long)]
        upgrade: bool,
        /// Test the configuration and exit.
        #[arg(short, long)]
        test: bool,
    },
    /// Validate the configuration; print each problem with its field path.
    Check,
    /// Graceful upgrade to a new process on FILE (the unit's ExecReload):
    /// start `serve -u -d`, hand over from the running process once the new
    /// one waits for the sockets, return once the new one serves.
    Reload {
        /// The running process (default: the one `server.pid_file` names).
        #[arg(long)]
        pid: Option<u32>,
    },
    /// Run the gateway with demo backends listening on the config's backend addresses.
    Demo,
    /// Manage API keys in the configured store.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// The usage ledger, for billing: one row per key, route and UTC day.
    Usage {
        /// First day, YYYY-MM-DD (default today, UTC).
        #[arg(long)]
        from: Option<String>,
        /// Last day, included, YYYY-MM-DD (default today, UTC).
        #[arg(long)]
        to: Option<String>,
        /// Only this key (the key or its id).
        #[arg(long, value_name = "KEY_OR_ID")]
        key: Option<String>,
        /// jsonl (JSON lines) or csv (with a header row).
        #[arg(long, default_value = "jsonl")]
        format: String,
    },
    /// Write the shell completions and man pages into DIR (packaging).
    #[command(hide = true)]
    Generate {
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
}

fn load(conf: Option<&PathBuf>) -> Result<Config, ExitCode> {
    let Some(path) = conf else {
        eprintln!("tollgate: -c FILE is required");
        return Err(ExitCode::from(2));
    };
    Config::load(path).map_err(|errors| {
        eprintln!(
            "{}: configuration has {} problem(s):",
            path.display(),
            errors.0.len()
        );
        for e in &errors.0 {
            eprintln!("  {e}");
        }
        ExitCode::FAILURE
    })
}

/// The configured store, and what comes with a Redis one.
struct Stores {
    keys: Arc<dyn Store>,
    /// The same store, for the admin API: its keys and its usage ledger.
    admin: Arc<dyn KeyAdmin>,
    ledger: Arc<dyn UsageLedger>,
    /// The Redis cache tier, when the store is Redis.
    shared_cache: Option<Arc<dyn SharedCache>>,
    /// The Redis store's settlement service.
    maintenance: Option<Maintenance>,
    /// With `store.leases`: reports and ends the leases.
    lease_keeper: Option<LeaseKeeper>,
}

fn open_store(config: &Config, metrics: &Metrics) -> Result<Stores, String> {
    let Some(redis) = &config.store.redis else {
        if config.store.keys.is_empty() {
            log::warn!(
                "the embedded store has no keys (store.keys_file): every request will get 401"
            );
        }
        let memory = Arc::new(
            MemoryStore::new(&config.store.keys).with_usage_retention(config.usage_retention_days),
        );
        return Ok(Stores {
            keys: memory.clone(),
            admin: memory.clone(),
            ledger: memory,
            shared_cache: None,
            maintenance: None,
            lease_keeper: None,
        });
    };
    // Connects on first use, inside the service, after Pingora daemonized.
    let redis = RedisStore::new(redis, &config.store.key_prefix, config.store.timeout)
        .map_err(|e| format!("{}: {e}", redis.field()))?;
    let redis = redis.with_usage_retention(config.usage_retention_days);
    let redis = Arc::new(redis.with_counters(StoreCounters {
        settle: metrics.store_error_counter("settle"),
        setup: metrics.store_error_counter("setup"),
        unsettled: metrics.store_unsettled(),
    }));
    let (keys, lease_keeper): (Arc<dyn Store>, _) = match config.store.leases {
        Some(leases) => {
            let (credits, requests) = metrics.leases();
            let leased = LeasedStore::new(redis.clone(), leases)
                .with_counters(LeaseCounters { credits, requests });
            let leased = Arc::new(leased);
            (leased.clone(), Some(LeaseKeeper(leased)))
        }
        None => (redis.clone(), None),
    };
    Ok(Stores {
        keys,
        lease_keeper,
        admin: redis.clone(),
        ledger: redis.clone(),
        shared_cache: Some(redis.clone()),
        maintenance: Some(Maintenance(redis)),
    })
}

/// The client-facing listeners.
fn add_listeners<A: Send + Sync + 'static>(
    proxy: &mut pingora::services::listening::Service<A>,
    listen: &[tollgate::config::Listener],
) {
    // TLS ones too: the front door shakes hands (src/tls.rs).
    for addr in listen.iter().map(|l| l.addr) {
        // No L4 read buffer: Pingora's default is 64 KiB per client
        // connection, while its HTTP/1 parser reads into its own buffer
        // anyway (bench/RESULTS.md, idle connections).
        proxy.add_listener(
            ListenerConfig::tcp(addr.to_string()).l4_buffer(L4BufferSettings::default().read(0)),
        );
    }
}

/// What `serve` builds before Pingora's server exists: the gateway and what
/// the services around it take. A failure here ends `serve` before a socket
/// is opened, with the message `tollgate: {error}`.
struct Parts {
    gateway: Gateway,
    /// The admin API's key endpoints, when `admin_token_sha256` is set.
    key_api: Option<admin::KeyApi>,
    lease_keeper: Option<LeaseKeeper>,
    maintenance: Option<Maintenance>,
    notifier: NotifierService,
    access_log: AccessLogService,
    connections: ConnectionCounters,
    tls: TlsListeners,
}

impl Parts {
    /// Metrics, store, notifier, access log and TLS, in that order, then the
    /// gateway over them; `draining` is what the gateway reads to answer
    /// while the server drains.
    fn build(config: &Config, draining: Draining) -> Result<Parts, String> {
        let metrics = match Metrics::register(&config.routes) {
            Ok(m) => Arc::new(m),
            Err(e) => return Err(format!("cannot register metrics: {e}")),
        };
        let stores = open_store(config, &metrics)?;
        let (notifier, notifier_service) =
            notify::channel(&config.notify, &config.routes, metrics.notifications());
        let (access_log, access_log_service) =
            logging::access_log(config.access_log.clone(), metrics.access_log_dropped());
        let connections = metrics.connections();
        let admin_requests = metrics.admin_requests();
        let tls = TlsListeners::new(&config.listen, metrics.tls_handshake_errors())?;
        let key_api = config.admin_token_sha256.map(|token_sha256| admin::KeyApi {
            store: stores.admin.clone(),
            ledger: stores.ledger.clone(),
            token_sha256,
            routes: config.routes.iter().map(|r| r.name.clone()).collect(),
            requests: admin_requests,
        });
        let gateway = Gateway::new(
            config,
            stores.keys,
            stores.shared_cache,
            metrics,
            notifier,
            access_log,
            draining,
        );
        Ok(Parts {
            gateway,
            key_api,
            lease_keeper: stores.lease_keeper,
            maintenance: stores.maintenance,
            notifier: notifier_service,
            access_log: access_log_service,
            connections,
            tls,
        })
    }
}

fn serve(mut config: Config, opt: Opt) -> ExitCode {
    if opt.upgrade {
        // Before the running process is asked for its sockets.
        let old = reload::running_pid(&config.server.pid_file);
        if let Err(e) = reload::preflight(&config, old) {
            eprintln!("tollgate serve -u: {e}");
            return ExitCode::FAILURE;
        }
    }
    let draining = Draining::default();
    let parts = match Parts::build(&config, draining.clone()) {
        Ok(parts) => parts,
        Err(e) => {
            eprintln!("tollgate: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut server = Server::new_with_opt_and_conf(opt, std::mem::take(&mut config.server));
    let phases = PhaseWatch::new(server.watch_execution_phase(), draining);
    // With -t this checks Pingora's side too, then exits.
    server.bootstrap();
    add_services(&mut server, &config, parts, phases);
    run(server, &config.listen)
}

/// Pingora's services: the proxy on the client listeners and the admin API,
/// both guarded by one `Health`, then the background work.
fn add_services(server: &mut Server, config: &Config, parts: Parts, phases: PhaseWatch) {
    let mut proxy = tollgate::front::service(
        &server.configuration,
        parts.gateway,
        "tollgate",
        &config.limits,
        parts.connections,
        parts.tls,
    );
    add_listeners(&mut proxy, &config.listen);
    let health = Health::default();
    server.add_service(Guarded::new(proxy, "proxy", &health));
    let admin = admin::service(
        &config.admin_listen.to_string(),
        health.clone(),
        parts.key_api,
    );
    server.add_service(Guarded::new(admin, "admin", &health));
    server.add_service(background_service("notifier", parts.notifier));
    server.add_service(background_service("access log", parts.access_log));
    server.add_service(background_service("drain", phases));
    server.add_service(background_service(
        "allocator purge",
        tollgate::memory::Purger,
    ));
    if let Some(k) = parts.lease_keeper {
        server.add_service(background_service("leases", k));
    }
    if let Some(m) = parts.maintenance {
        server.add_service(background_service("store", m));
    }
}

/// Run `server` until it stops. A process that handed its sockets over (a
/// graceful upgrade) fails if no process listens on them afterwards.
fn run(server: Server, listen: &[tollgate::config::Listener]) -> ExitCode {
    let signals = reload::Signals::new(&server.configuration.upgrade_sock);
    let handed_over = signals.handed_over();
    server.run(RunArgs {
        shutdown_signal: Box::new(signals),
    });
    if handed_over.load(std::sync::atomic::Ordering::Relaxed) && !reload::taken_over(listen) {
        log::error!("handed the sockets over, but no process listens on them now");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Generate { out } = &cli.command {
        return match generate::write(Cli::command(), out) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("tollgate generate: {}: {e}", out.display());
                ExitCode::FAILURE
            }
        };
    }
    let config = match load(cli.conf.as_ref()) {
        Ok(c) => c,
        Err(code) => return code,
    };
    match cli.command {
        Command::Check => check(&config),
        Command::Reload { pid } => match cli.conf.as_ref() {
            Some(conf) => reload_to(&config, conf, pid),
            None => ExitCode::from(2),
        },
        Command::Serve {
            daemon,
            upgrade,
            test,
        } => {
            let opt = Opt {
                upgrade,
                daemon,
                nocapture: false,
                test,
                conf: None,
            };
            serve_logged(config, opt)
        }
        Command::Demo => serve_demo(config),
        Command::Keys { command } => {
            let mut out = std::io::stdout().lock();
            cli_run("keys", tollgate::keys::run(&config, command, &mut out))
        }
        Command::Usage {
            from,
            to,
            key,
            format,
        } => {
            let mut out = std::io::stdout().lock();
            let range = (from.as_deref(), to.as_deref());
            let run = tollgate::usage::run(&config, range, key.as_deref(), &format, &mut out);
            cli_run("usage", run)
        }
        Command::Generate { .. } => unreachable!("handled before the config is loaded"),
    }
}

/// `tollgate check`: the config loaded, so print its warnings and say OK.
fn check(config: &Config) -> ExitCode {
    for w in &config.warnings {
        eprintln!("warning: {w}");
    }
    println!("configuration OK: {} route(s)", config.routes.len());
    ExitCode::SUCCESS
}

/// `tollgate reload`: a graceful upgrade to a new process on `conf`.
fn reload_to(config: &Config, conf: &Path, pid: Option<u32>) -> ExitCode {
    match reload::reload(config, conf, pid) {
        Ok(done) => {
            println!("{done}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tollgate reload: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `tollgate serve`: start the log, put the config's warnings in it, serve.
fn serve_logged(config: Config, opt: Opt) -> ExitCode {
    logging::init();
    for w in &config.warnings {
        log::warn!("{w}");
    }
    serve(config, opt)
}

/// `tollgate demo`: start the demo backends, then serve in the foreground.
fn serve_demo(config: Config) -> ExitCode {
    logging::init();
    match demo::start(&config) {
        Ok(addrs) => log::info!("demo backends listening on {addrs:?}"),
        Err(e) => {
            eprintln!("tollgate demo: {e}");
            return ExitCode::FAILURE;
        }
    }
    serve(config, Opt::default())
}

/// Run a command's work on a one-thread runtime; its error on stderr.
fn cli_run(name: &str, work: impl std::future::Future<Output = Result<(), String>>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("tollgate {name}: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(work) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tollgate {name}: {e}");
            ExitCode::FAILURE
        }
    }
}
