//! The `turnstile` binary: `turnstile [--config FILE]` runs the proxy,
//! `turnstile check` validates a config and prints its table, `turnstile
//! health` probes a running instance (container health checks) and
//! `turnstile example-api` runs the bundled fake generation API.
//! SIGHUP reloads the config; SIGTERM/SIGINT drain and stop.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use tracing_subscriber::EnvFilter;

/// mimalloc: a proxied request makes a dozen small short-lived allocations
/// (header maps, header values, body buffers); glibc malloc spent about 15%
/// of the instructions of a request on them.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(
    name = "turnstile",
    version,
    about = "A rate-limiting reverse proxy for generation APIs"
)]
struct Cli {
    #[command(flatten)]
    config: ConfigArg,
    /// Log output format.
    #[arg(
        long,
        global = true,
        env = "TURNSTILE_LOG_FORMAT",
        value_enum,
        default_value_t = LogFormat::Pretty
    )]
    log_format: LogFormat,
    /// Worker threads (default: one per CPU core; 1: a single-threaded runtime).
    #[arg(long, env = "TURNSTILE_THREADS")]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Option<Command>,
}

/// `--config`, on the commands that read one (not on `example-api`).
#[derive(Debug, Clone, Args)]
struct ConfigArg {
    /// The config file [default: config/turnstile.toml].
    #[arg(long, short, env = "TURNSTILE_CONFIG")]
    config: Option<PathBuf>,
}

impl ConfigArg {
    /// This command's `--config`, else the one given before the command.
    fn or(self, outer: ConfigArg) -> PathBuf {
        self.config
            .or(outer.config)
            .unwrap_or_else(|| PathBuf::from("config/turnstile.toml"))
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Pretty,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Validate the config (and keys file) and print the routes × plans table.
    Check {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Probe a running turnstile: `GET /healthz` on the admin listener of
    /// the config (loopback for a wildcard bind); exit 0 only on a 200.
    /// Without `[admin]`, checks that the proxy port accepts connections.
    Health {
        #[command(flatten)]
        config: ConfigArg,
        /// Probe this address instead of the one in the config.
        #[arg(long)]
        addr: Option<SocketAddr>,
        /// Give up after this long.
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Create, list, re-plan and revoke runtime keys through a running
    /// turnstile's admin API (token from TURNSTILE_ADMIN_TOKEN), or print a
    /// key's keys-file entry (`hash`, offline).
    Keys {
        /// The admin API of the running turnstile.
        #[arg(
            long,
            env = "TURNSTILE_ADMIN_URL",
            default_value = "http://127.0.0.1:9090",
            global = true
        )]
        admin: String,
        #[command(subcommand)]
        action: KeysAction,
    },
    /// Run the bundled example generation API (a fake upstream to try
    /// turnstile against); needs no config.
    ExampleApi {
        /// Listen address.
        #[arg(long, env = "EXAMPLE_API_LISTEN", default_value = "127.0.0.1:9000")]
        listen: SocketAddr,
    },
}

#[derive(Debug, Subcommand)]
enum KeysAction {
    /// Make a key: printed alone on stdout, this once (only its SHA-256 is
    /// stored); `--json` prints the whole answer.
    Create {
        #[arg(long)]
        account: String,
        #[arg(long)]
        plan: String,
        /// A label for people.
        #[arg(long)]
        name: Option<String>,
        /// RFC 3339, e.g. 2027-01-01T00:00:00Z.
        #[arg(long)]
        expires_at: Option<String>,
        /// Print the whole answer (key, fingerprint, record) as JSON
        /// instead of the key alone.
        #[arg(long)]
        json: bool,
    },
    /// An account's keys (file keys included), by fingerprint.
    List {
        #[arg(long)]
        account: String,
    },
    /// Revoke a runtime key (refused from the next request on).
    Revoke { fingerprint: String },
    /// Move a runtime key to another plan.
    Plan { fingerprint: String, plan: String },
    /// Print the keys-file entry (`sha256 = "..."`) of a key; `-` reads it from stdin.
    Hash { key: String },
}

fn keys(admin: &str, action: KeysAction) -> ExitCode {
    use turnstile::cli::keys::{hash_entry, run, KeysCall};
    let call = match action {
        KeysAction::Hash { key } => {
            let key = if key == "-" {
                let mut line = String::new();
                if std::io::stdin().read_line(&mut line).is_err() {
                    eprintln!("error: cannot read the key from stdin");
                    return ExitCode::FAILURE;
                }
                line
            } else {
                key
            };
            println!("{}", hash_entry(&key));
            return ExitCode::SUCCESS;
        }
        KeysAction::Create {
            account,
            plan,
            name,
            expires_at,
            json,
        } => KeysCall::Create {
            account,
            plan,
            name,
            expires_at,
            json,
        },
        KeysAction::List { account } => KeysCall::List { account },
        KeysAction::Revoke { fingerprint } => KeysCall::Revoke { fingerprint },
        KeysAction::Plan { fingerprint, plan } => KeysCall::Plan { fingerprint, plan },
    };
    let token = std::env::var("TURNSTILE_ADMIN_TOKEN").ok();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(admin, token.as_deref(), call)) {
        Ok(printed) => {
            println!("{}", printed.stdout);
            if let Some(note) = printed.note {
                eprintln!("{note}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Keys { admin, action }) = cli.command {
        return keys(&admin, action);
    }
    if let Some(Command::ExampleApi { listen }) = cli.command {
        init_logging(cli.log_format);
        return run(cli.threads, example_api(listen));
    }
    if let Some(Command::Health {
        addr: Some(addr),
        timeout,
        ..
    }) = cli.command
    {
        return health(turnstile::admin::probe_healthz(addr, timeout));
    }
    let config_path = match &cli.command {
        Some(Command::Check { config }) | Some(Command::Health { config, .. }) => {
            config.clone().or(cli.config.clone())
        }
        _ => cli.config.clone().or(ConfigArg { config: None }),
    };
    let policy = match turnstile::load(&config_path) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    match cli.command {
        Some(Command::Check { .. }) => {
            print!("{}", policy.table());
            println!(
                "{}: OK ({} routes, {} plans)",
                config_path.display(),
                policy.routes.len(),
                policy.plans.len()
            );
            ExitCode::SUCCESS
        }
        Some(Command::Health { timeout, .. }) => health(match &policy.admin {
            Some(admin) => {
                let target = turnstile::admin::probe_target(admin.listen);
                turnstile::admin::probe_healthz(target, timeout)
            }
            None => {
                let target = turnstile::admin::probe_target(policy.server.listen);
                std::net::TcpStream::connect_timeout(&target, timeout)
                    .map(drop)
                    .map_err(|source| turnstile::admin::ProbeError::Unreachable {
                        addr: target,
                        source,
                    })
            }
        }),
        Some(Command::ExampleApi { .. }) | Some(Command::Keys { .. }) | None => {
            init_logging(cli.log_format);
            run(cli.threads, serve(policy))
        }
    }
}

/// Runs `task` on a runtime with `threads` workers (one per core by
/// default; `1` is a current-thread runtime, like a single nginx worker).
fn run(
    threads: Option<usize>,
    task: impl std::future::Future<Output = std::io::Result<()>>,
) -> ExitCode {
    let mut builder = match threads {
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n.max(1));
            b
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(task) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn health(outcome: Result<(), turnstile::admin::ProbeError>) -> ExitCode {
    match outcome {
        Ok(()) => {
            println!("healthy");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("unhealthy: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn example_api(listen: SocketAddr) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {listen}: {e}")))?;
    tracing::info!(listen = %listener.local_addr()?, "example generation API listening");
    tokio::select! {
        served = turnstile::cli::example_api::serve(listener) => served,
        () = shutdown_signal() => Ok(()),
    }
}

async fn serve(policy: turnstile::Policy) -> std::io::Result<()> {
    let listen = policy.server.listen;
    let upstream = policy.upstream.authority.clone();
    let server = turnstile::Server::bind(policy, Arc::new(turnstile::SystemClock))
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {listen}: {e}")))?;
    let admin = server
        .admin_addr()
        .map_or_else(|| "off".to_owned(), |a| a.to_string());
    tracing::info!(listen = %server.local_addr()?, %admin, %upstream, "turnstile listening");
    let app = server.app().clone();
    #[cfg(unix)]
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            return;
        };
        while hup.recv().await.is_some() {
            tracing::info!("SIGHUP: reloading the config");
            // The outcome is logged (and counted) by reload itself.
            let _ = app.reload();
        }
    });
    server.run(shutdown_signal()).await?;
    tracing::info!("turnstile stopped");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    turnstile::observe::access_log::set_json(matches!(format, LogFormat::Json));
    match format {
        LogFormat::Pretty => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
