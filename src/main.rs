//! The `detour` command line.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use detour::config::{self, ConfigError};
use detour::mock::{self, Flavor, MockOptions};
use detour::state::Gateway;
use detour::telemetry::{self, LogFormat};

#[derive(Parser)]
#[command(
    name = "detour",
    version,
    about = "An LLM gateway that routes around provider outages"
)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Serve {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a config file and print every problem with file, line and key.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Run a fake provider with scriptable faults (see README: "The mock").
    Mock {
        #[arg(long, value_enum, default_value_t = Flavor::Openai)]
        flavor: Flavor,
        #[arg(long, default_value = "127.0.0.1:9000")]
        listen: SocketAddr,
        /// Seed for fault decisions and generated content.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Content chunks per streamed answer.
        #[arg(long, default_value_t = 8)]
        chunks: usize,
        /// Gap between streamed chunks, in milliseconds.
        #[arg(long, default_value_t = 0)]
        chunk_gap_ms: u64,
        /// Require this API key (`Authorization: Bearer ...`).
        #[arg(long, env = "DETOUR_MOCK_API_KEY")]
        api_key: Option<String>,
    },
    /// Start two mock providers and a gateway in front of them; no keys needed.
    Demo {
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The demo prints its own story; its request logs would drown it.
    let level = if matches!(cli.command, Command::Demo { .. }) {
        "error"
    } else {
        "info"
    };
    telemetry::init(cli.log_format, level);
    // One crypto provider for every TLS connection; installing can only fail
    // if one is already installed, which is fine.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("detour: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(cli.command));
    // Don't wait for idle keep-alive connections to close.
    runtime.shutdown_timeout(Duration::from_secs(1));
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("detour: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Check { config } => Ok(match config::load_file(&config) {
            Ok(c) => {
                println!(
                    "{}: ok ({} providers, {} routes, {} keys)",
                    config.display(),
                    c.providers.len(),
                    c.routes.len(),
                    c.keys.len()
                );
                ExitCode::SUCCESS
            }
            Err(e) => config_failed(&e),
        }),
        Command::Serve { config } => {
            let cfg = match config::load_file(&config) {
                Ok(c) => c,
                Err(e) => return Ok(config_failed(&e)),
            };
            serve(cfg).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Mock {
            flavor,
            listen,
            seed,
            chunks,
            chunk_gap_ms,
            api_key,
        } => {
            let opts = MockOptions {
                seed,
                chunks,
                chunk_gap: Duration::from_millis(chunk_gap_ms),
                api_key,
            };
            mock::run(flavor, listen, opts).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo { listen } => {
            detour::demo::run(listen, shutdown_signal()).await?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn config_failed(e: &ConfigError) -> ExitCode {
    eprintln!("{e}");
    eprintln!("detour: the configuration is invalid");
    ExitCode::from(2)
}

async fn serve(cfg: config::Config) -> anyhow::Result<()> {
    let listen = cfg.server.listen;
    let admin_listen = cfg.server.admin_listen;
    if cfg.server.open_access {
        tracing::warn!(
            "NO API KEYS CONFIGURED: detour is serving without authentication on {listen}; \
             anyone who can reach this address can use your providers"
        );
    }
    let gw = Arc::new(Gateway::new(cfg)?);
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
    tracing::info!("detour listening on http://{}", listener.local_addr()?);
    if let Some(admin_listen) = admin_listen {
        let token = std::env::var(detour::admin::TOKEN_ENV).ok();
        if token.as_deref().is_none_or(str::is_empty) {
            tracing::warn!(
                "admin listener on {admin_listen} refuses every call: set {} to enable it",
                detour::admin::TOKEN_ENV
            );
        }
        let admin = tokio::net::TcpListener::bind(admin_listen)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {admin_listen} (admin): {e}"))?;
        tracing::info!("admin listening on http://{}", admin.local_addr()?);
        let router = detour::admin::router(Arc::clone(&gw), token);
        tokio::spawn(async move {
            if let Err(e) = axum::serve(admin, router).await {
                tracing::error!("admin listener failed: {e}");
            }
        });
    }
    detour::server::serve(gw, listener, shutdown_signal()).await?;
    tracing::info!("detour stopped");
    Ok(())
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}
