//! The `iamlet` binary: parse flags, load config, start logging, run, map the result to an
//! exit code. Everything else lives in the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use iamlet::config::{Config, Overrides};
use iamlet::kiam::server::Server;
use iamlet::{App, admin, telemetry};

#[derive(Parser)]
#[command(
    name = "iamlet",
    version,
    about = "Per-pod AWS credentials for Kubernetes, from a node-local IMDS"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the node daemon.
    Agent(AgentArgs),
    /// Run the kiam-compatible server (cluster-wide watch, policy, STS) for server-backed agents.
    Server(ServerArgs),
    /// Work with configuration files.
    Config {
        #[command(subcommand)]
        action: ConfigAction,
    },
    /// Manage the interception rule.
    Iptables {
        #[command(subcommand)]
        action: IptablesAction,
    },
    /// List the pods a running iamlet knows: IP, pod, role (or why none), credentials' expiry.
    Status {
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Probe a running iamlet's admin port; exit 0 when it answers 200.
    Health {
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Ask /readyz instead of /healthz.
        #[arg(long)]
        ready: bool,
    },
}

#[derive(Subcommand)]
enum ConfigAction {
    /// Validate a config file (with the IAMLET_* environment); exit 0 when valid.
    Check { file: PathBuf },
}

#[derive(Subcommand)]
enum IptablesAction {
    /// Remove the interception rule and iamlet's chain (for an uninstall); exit 0 when gone.
    Uninstall {
        /// The agent's config: its iptables.backend picks the backend as the agent does.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
}

#[derive(clap::Args)]
struct AgentArgs {
    /// TOML config file.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Pod-facing address (imds.listen).
    #[arg(long)]
    imds_listen: Option<SocketAddr>,
    /// Admin address (admin.listen).
    #[arg(long)]
    admin_listen: Option<SocketAddr>,
    /// optional or required (imds.tokens).
    #[arg(long)]
    tokens: Option<String>,
    /// Log level or tracing directives (log.level).
    #[arg(long)]
    log_level: Option<String>,
    /// text or json (log.format).
    #[arg(long)]
    log_format: Option<String>,
}

#[derive(clap::Args)]
struct ServerArgs {
    /// TOML config file.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// gRPC address (server.listen).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Admin address (admin.listen).
    #[arg(long)]
    admin_listen: Option<SocketAddr>,
    /// Log level or tracing directives (log.level).
    #[arg(long)]
    log_level: Option<String>,
    /// text or json (log.format).
    #[arg(long)]
    log_format: Option<String>,
}

impl ServerArgs {
    fn overrides(&self) -> Overrides {
        let mut overrides: Overrides = Vec::new();
        let mut set = |key, value: Option<String>| {
            if let Some(value) = value {
                overrides.push((key, value.into()));
            }
        };
        set("server.listen", self.listen.map(|a| a.to_string()));
        set("admin.listen", self.admin_listen.map(|a| a.to_string()));
        set("log.level", self.log_level.clone());
        set("log.format", self.log_format.clone());
        overrides
    }
}

impl AgentArgs {
    fn overrides(&self) -> Overrides {
        let mut overrides: Overrides = Vec::new();
        let mut set = |key, value: Option<String>| {
            if let Some(value) = value {
                overrides.push((key, value.into()));
            }
        };
        set("imds.listen", self.imds_listen.map(|a| a.to_string()));
        set("admin.listen", self.admin_listen.map(|a| a.to_string()));
        set("imds.tokens", self.tokens.clone());
        set("log.level", self.log_level.clone());
        set("log.format", self.log_format.clone());
        overrides
    }
}

/// Exit codes: 0 success, 1 failure at run time, 2 bad configuration.
const EXIT_CONFIG: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Config {
            action: ConfigAction::Check { file },
        } => match Config::load(Some(&file), Vec::new()) {
            Ok(_) => {
                println!("{}: valid", file.display());
                ExitCode::SUCCESS
            }
            Err(err) => {
                eprintln!("{}: {err}", file.display());
                ExitCode::from(EXIT_CONFIG)
            }
        },
        Command::Health { config, ready } => health(config, ready),
        Command::Status { config } => status(config),
        Command::Iptables {
            action: IptablesAction::Uninstall { config },
        } => uninstall(config),
        Command::Agent(args) => daemon(args.config.as_deref(), args.overrides(), Daemon::Agent),
        Command::Server(args) => daemon(args.config.as_deref(), args.overrides(), Daemon::Server),
    }
}

/// Which long-running process to run.
#[derive(Clone, Copy)]
enum Daemon {
    Agent,
    Server,
}

fn daemon(file: Option<&std::path::Path>, overrides: Overrides, daemon: Daemon) -> ExitCode {
    let config = match Config::load(file, overrides) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("iamlet: configuration error: {err}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if let Err(err) = telemetry::init(&config.log) {
        eprintln!("iamlet: cannot start logging: {err}");
        return ExitCode::from(EXIT_CONFIG);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("iamlet: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result: anyhow::Result<()> = runtime.block_on(async {
        match daemon {
            Daemon::Agent => {
                tracing::info!(version = env!("CARGO_PKG_VERSION"), "iamlet agent starting");
                let app = App::build(config).await.context("start-up failed")?;
                app.run(shutdown_signal()).await?;
            }
            Daemon::Server => {
                tracing::info!(
                    version = env!("CARGO_PKG_VERSION"),
                    "iamlet server starting"
                );
                let server = Server::build(config).await.context("start-up failed")?;
                server.run(shutdown_signal()).await?;
            }
        }
        Ok(())
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            let report = report(&err);
            tracing::error!("{report}");
            eprintln!("iamlet: {report}");
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes, each said once: iamlet's errors put their cause in their own text
/// (so they read well alone) and also return it as `source()`; `{:#}` would repeat it.
fn report(err: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in err.chain().map(ToString::to_string) {
        if text.contains(&cause) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&cause);
    }
    text
}

/// Completes on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(term) => term,
        Err(err) => {
            tracing::error!("cannot listen for SIGTERM: {err}");
            std::future::pending::<()>().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
    }
}

fn uninstall(config: Option<PathBuf>) -> ExitCode {
    let config = match Config::load(config.as_deref(), Vec::new()) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("iamlet iptables uninstall: configuration error: {err}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    // The same choice the agent makes, so the rule is looked for where the agent put it.
    let selection = iamlet::iptables::select(config.iptables.backend);
    println!(
        "iptables backend: {} ({})",
        selection.backend.name(),
        selection.reason
    );
    match iamlet::iptables::remove(selection.backend) {
        Ok(true) => {
            println!(
                "removed the {} and {} chains and the jumps to them",
                iamlet::iptables::CHAIN,
                iamlet::iptables::LOCAL_CHAIN
            );
            ExitCode::SUCCESS
        }
        Ok(false) => {
            println!(
                "nothing to remove: no {} or {} chain",
                iamlet::iptables::CHAIN,
                iamlet::iptables::LOCAL_CHAIN
            );
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("iamlet iptables uninstall: {err}");
            ExitCode::FAILURE
        }
    }
}

fn status(config: Option<PathBuf>) -> ExitCode {
    let config = match Config::load(config.as_deref(), Vec::new()) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("iamlet status: configuration error: {err}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if config.admin.status_socket.as_os_str().is_empty() {
        eprintln!("iamlet status: admin.status_socket is empty: this iamlet serves no status");
        return ExitCode::FAILURE;
    }
    let table = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|rt| {
            rt.block_on(iamlet::status::fetch(&config.admin.status_socket))
                .map_err(anyhow::Error::from)
        });
    match table {
        Ok(table) => {
            print!("{table}");
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("iamlet status: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn health(config: Option<PathBuf>, ready: bool) -> ExitCode {
    let config = match Config::load(config.as_deref(), Vec::new()) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("iamlet health: configuration error: {err}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let path = if ready { "/readyz" } else { "/healthz" };
    let probe = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|rt| {
            rt.block_on(admin::probe(config.admin.listen, path))
                .map_err(Into::into)
        });
    match probe {
        Ok((200, body)) => {
            print!("{body}");
            ExitCode::SUCCESS
        }
        Ok((status, body)) => {
            eprintln!("iamlet health: {path} answered {status}: {}", body.trim());
            ExitCode::FAILURE
        }
        Err(err) => {
            eprintln!("iamlet health: {err:#}");
            ExitCode::FAILURE
        }
    }
}
