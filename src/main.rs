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
        /// Where detour keeps its last-known-good config (default: `.detour`
        /// beside the config file).
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// If the config is invalid, serve the last-known-good one instead of
        /// refusing to start (and say so loudly).
        #[arg(long)]
        fallback_last_known_good: bool,
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
    /// Replay the incidents detour is built against on your config, with
    /// every provider replaced by a mock, and print a report card.
    Drill {
        /// The config to drill, loaded as `detour check` loads it.
        #[arg(long, short)]
        config: PathBuf,
        /// About 3 s per scenario instead of about 9.
        #[arg(long)]
        quick: bool,
        /// Also write the card as JSON to this file.
        #[arg(long, value_name = "OUT")]
        json: Option<PathBuf>,
        /// Run only these scenarios (repeat, or separate with commas):
        /// provider_down, provider_hanging, rate_limit_storm, brownout,
        /// sheddable_flood, dns_and_bad_reload.
        #[arg(long = "scenario", value_name = "NAME", value_delimiter = ',', num_args = 1..)]
        scenarios: Vec<String>,
        /// Most client errors a scenario may have, as a share (0.01 = 1%).
        #[arg(long)]
        max_error_rate: Option<f64>,
        /// Longest time to fail over (e.g. 2s, 500ms).
        #[arg(long, value_parser = parse_duration_arg)]
        max_failover: Option<Duration>,
        /// Most upstream requests per client request during a fault.
        #[arg(long)]
        max_amplification: Option<f64>,
        /// Most the critical p99 may grow in a sheddable flood, as a multiple.
        #[arg(long)]
        max_flood_p99_ratio: Option<f64>,
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
    // So does the drill, whose card would drown in the request logs.
    let level = if matches!(cli.command, Command::Demo { .. } | Command::Drill { .. }) {
        "error"
    } else {
        "info"
    };
    // Held to the end of `main`: dropping it writes out the queued lines.
    let _log = telemetry::init(cli.log_format, level);
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
                // Not errors: the config is served as it is.
                for w in &c.warnings {
                    println!("warning: {w}");
                }
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
        Command::Serve {
            config,
            state_dir,
            fallback_last_known_good,
        } => {
            let state_dir = state_dir.unwrap_or_else(|| {
                config
                    .parent()
                    .filter(|p| !p.as_os_str().is_empty())
                    .unwrap_or(std::path::Path::new("."))
                    .join(".detour")
            });
            let file = config.display().to_string();
            let loaded = std::fs::read_to_string(&config)
                .map_err(|source| ConfigError::Read {
                    file: file.clone(),
                    source,
                })
                .and_then(|text| config::load_str(&text, &file).map(|c| (c, text)));
            let (cfg, text) = match loaded {
                Ok(ok) => ok,
                Err(e) if fallback_last_known_good => {
                    eprintln!("{e}");
                    match last_known_good(&state_dir) {
                        Some(ok) => ok,
                        None => return Ok(config_failed(&e)),
                    }
                }
                Err(e) => return Ok(config_failed(&e)),
            };
            serve(cfg, text, config, state_dir).await?;
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
        Command::Drill {
            config,
            quick,
            json,
            scenarios,
            max_error_rate,
            max_failover,
            max_amplification,
            max_flood_p99_ratio,
        } => {
            let opts = detour::drill::Options {
                config,
                quick,
                scenarios,
                marks: detour::drill::Marks {
                    max_error_rate,
                    max_failover,
                    max_amplification,
                    max_flood_p99_ratio,
                },
            };
            drill(opts, json).await
        }
        Command::Demo { listen } => {
            detour::demo::run(listen, shutdown_signal()).await?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Runs the drill, prints its card and writes its JSON: exit 0 when every
/// scenario passed, 1 when one failed, 2 when the config or a flag is wrong,
/// 3 when the drill could not run (a port, a temporary file).
async fn drill(opts: detour::drill::Options, json: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    let card = match detour::drill::run(opts).await {
        Ok(card) => card,
        Err(detour::drill::DrillError::Config(e)) => return Ok(config_failed(&e)),
        Err(e) if e.is_usage() => {
            eprintln!("detour drill: {e}");
            return Ok(ExitCode::from(2));
        }
        // The drill itself could not run: neither a pass nor a failed mark.
        Err(e) => {
            eprintln!("detour drill: cannot run: {e}");
            return Ok(ExitCode::from(3));
        }
    };
    print!("{}", card.render());
    if let Some(path) = json {
        let body = serde_json::to_vec_pretty(&card)?;
        std::fs::write(&path, body)
            .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
        eprintln!("drill: card written to {}", path.display());
    }
    Ok(if card.passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn parse_duration_arg(text: &str) -> Result<Duration, String> {
    config::parse_duration(text)
        .filter(|d| !d.is_zero())
        .ok_or_else(|| format!("`{text}` is not a duration (for example 500ms, 2s)"))
}

/// The last-known-good config from `state_dir`, announced loudly.
fn last_known_good(state_dir: &std::path::Path) -> Option<(config::Config, String)> {
    let path = detour::reload::lkg_path(state_dir);
    let file = path.display().to_string();
    let Ok(text) = std::fs::read_to_string(&path) else {
        eprintln!("detour: no last-known-good config at {file}");
        return None;
    };
    match config::load_str(&text, &file) {
        Ok(cfg) => {
            eprintln!(
                "detour: THE CONFIG IS INVALID; SERVING THE LAST-KNOWN-GOOD CONFIG FROM {file}. \
                 Fix the config file: it is watched and will be applied once valid."
            );
            tracing::error!(path = %file, "serving the last-known-good config: the config file is invalid");
            Some((cfg, text))
        }
        Err(e) => {
            eprintln!("{e}\ndetour: the last-known-good config is not valid either");
            None
        }
    }
}

fn config_failed(e: &ConfigError) -> ExitCode {
    eprintln!("{e}");
    eprintln!("detour: the configuration is invalid");
    ExitCode::from(2)
}

async fn serve(
    cfg: config::Config,
    text: String,
    config_path: PathBuf,
    state_dir: PathBuf,
) -> anyhow::Result<()> {
    let listen = cfg.server.listen;
    let admin_listen = cfg.server.admin_listen;
    for w in &cfg.warnings {
        tracing::warn!("config: {w}");
    }
    if cfg.server.open_access {
        tracing::warn!(
            "NO API KEYS CONFIGURED: detour is serving without authentication on {listen}; \
             anyone who can reach this address can use your providers"
        );
    }
    // Record metrics from the first request on.
    let _ = detour::metrics::handle();
    // Before the gateway: providers' clients keep one pool per worker.
    let threads = cfg
        .server
        .worker_threads
        .unwrap_or_else(detour::workers::default_count);
    let workers = detour::workers::Workers::start(threads)
        .map_err(|e| anyhow::anyhow!("cannot start {threads} worker threads: {e}"))?;
    let gw = Arc::new(Gateway::new(cfg)?);
    gw.set_source(Some(text.clone()));
    // A replica that starts while the others bake this very file follows them.
    detour::reload::join_replicas_rollout(
        &gw,
        &text,
        &config_path.display().to_string(),
        Duration::from_secs(2),
    )
    .await;
    // The gateway keeps its own copy; this one would double the text's cost.
    drop(text);
    // Loading's peak is freed now; this thread may not allocate again soon.
    detour_alloc::give_back_now();
    gw.set_ops(Some(config_path), Some(state_dir));
    // The control plane: reloads and their judges run on this runtime.
    let reloader = detour::reload::Reloader::new(Arc::clone(&gw));
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
        let admin = std::net::TcpListener::bind(admin_listen)
            .map_err(|e| anyhow::anyhow!("cannot listen on {admin_listen} (admin): {e}"))?;
        tracing::info!("admin listening on http://{}", admin.local_addr()?);
        detour::admin::spawn_thread(admin, Arc::clone(&reloader), token)?;
    }
    tokio::spawn(detour::status_pages::keep_polling(Arc::clone(&gw)));
    tokio::spawn(detour::reload::watch(reloader));
    tokio::spawn(detour::reload::keep_last_known_good(Arc::clone(&gw)));
    tracing::info!(
        workers = workers.len(),
        "serving on {} worker threads",
        workers.len()
    );
    detour::server::serve(
        gw,
        listener,
        detour::public_status::routes(),
        Some(&workers),
        shutdown_signal(),
    )
    .await?;
    drop(workers);
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

/// mimalloc ([`detour_alloc`]).
#[global_allocator]
static GLOBAL: detour_alloc::MiMalloc = detour_alloc::MiMalloc;
