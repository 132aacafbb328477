//! The `turnstile` binary: `turnstile [--config FILE]` runs the proxy,
//! `turnstile check [--config FILE]` validates a config and prints its table.
//! SIGHUP reloads the config; SIGTERM/SIGINT drain and stop.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand, ValueEnum};
use tracing_subscriber::EnvFilter;

#[derive(Debug, Parser)]
#[command(
    name = "turnstile",
    version,
    about = "A rate-limiting reverse proxy for generation APIs"
)]
struct Cli {
    /// The config file.
    #[arg(
        long,
        short,
        global = true,
        env = "TURNSTILE_CONFIG",
        default_value = "config/turnstile.toml"
    )]
    config: PathBuf,
    /// Log output format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Pretty)]
    log_format: LogFormat,
    /// Worker threads (default: one per CPU core; 1: a single-threaded runtime).
    #[arg(long, env = "TURNSTILE_THREADS")]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Pretty,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Validate the config (and keys file) and print the routes × plans table.
    Check,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let policy = match turnstile::load(&cli.config) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(Command::Check) = cli.command {
        print!("{}", policy.table());
        println!(
            "{}: OK ({} routes, {} plans)",
            cli.config.display(),
            policy.routes.len(),
            policy.plans.len()
        );
        return ExitCode::SUCCESS;
    }
    init_logging(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(policy)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(policy: turnstile::Policy) -> std::io::Result<()> {
    let listen = policy.server.listen;
    let upstream = policy.upstream.authority.clone();
    let server = turnstile::Server::bind(policy, Arc::new(turnstile::SystemClock))
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {listen}: {e}")))?;
    tracing::info!(listen = %server.local_addr()?, admin = ?server.admin_addr(), %upstream, "turnstile listening");
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
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Pretty => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
