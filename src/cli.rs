//! The command line: one subcommand per service, `up` for all of them, and operator commands.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use leadrelay_runtime::{Settings, telemetry};

use crate::{healthcheck, services::ServiceKind, up};

/// Exit code for bad configuration, distinct from runtime failures.
const EXIT_CONFIG: u8 = 2;

/// LeadRelay keeps Hana leads and tickets in step with Pipedrive and SalesMan CRM.
///
/// Settings come from LEADRELAY_* environment variables and the TOML file named by
/// LEADRELAY_CONFIG; see README.md for the full list.
#[derive(Debug, Parser)]
#[command(name = "leadrelay", version, about, long_about)]
pub(crate) struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Runs all five services in one process, on their own ports, with SQLite under ./data.
    Up,
    /// Runs the HTTP gateway that turns webhooks into orchestrator calls.
    Gateway,
    /// Runs the orchestrator: the store, ingest, sync jobs and the admin API.
    Orchestrator,
    /// Runs the Hana adapter.
    HanaAdapter,
    /// Runs the Pipedrive adapter.
    PipedriveAdapter,
    /// Runs the SalesMan adapter.
    SalesmanAdapter,
    /// Checks a gRPC service's health; exits 0 when it is SERVING.
    Healthcheck(healthcheck::Args),
    /// Applies the database migrations to LEADRELAY_DATABASE_URL and exits.
    Migrate,
    /// Prints event and job counts by state, and the age of the oldest pending job.
    Status,
    /// Lists, retries or replays sync jobs.
    #[command(subcommand)]
    Jobs(crate::admin::JobsCommand),
}

/// The settings an admin command needs (where the orchestrator is), or the exit code of a bad
/// configuration.
fn admin_settings() -> Result<Settings, ExitCode> {
    Settings::from_env().map_err(|error| {
        eprintln!("error: {error}");
        ExitCode::from(EXIT_CONFIG)
    })
}

/// Runs the parsed command and returns the process exit code.
pub(crate) async fn run(cli: Cli) -> ExitCode {
    let service = match cli.command {
        Command::Healthcheck(args) => return healthcheck::run(args).await,
        Command::Status => {
            return match admin_settings() {
                Ok(settings) => crate::admin::status(&settings).await,
                Err(code) => code,
            };
        }
        Command::Jobs(command) => {
            return match admin_settings() {
                Ok(settings) => crate::admin::jobs(&settings, command).await,
                Err(code) => code,
            };
        }
        Command::Up => None,
        Command::Migrate => Some(ServiceKind::Migrate),
        Command::Gateway => Some(ServiceKind::Gateway),
        Command::Orchestrator => Some(ServiceKind::Orchestrator),
        Command::HanaAdapter => Some(ServiceKind::HanaAdapter),
        Command::PipedriveAdapter => Some(ServiceKind::PipedriveAdapter),
        Command::SalesmanAdapter => Some(ServiceKind::SalesmanAdapter),
    };
    let settings = match Settings::from_env() {
        Ok(settings) => settings,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if let Some(Err(error)) = service.map(|kind| kind.preflight(&settings)) {
        eprintln!("error: {error}");
        return ExitCode::from(EXIT_CONFIG);
    }
    let name = service.map_or("leadrelay", ServiceKind::name);
    let _telemetry = match telemetry::init(&settings.telemetry, name) {
        Ok(guard) => guard,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let result = match service {
        None => up::run(settings).await,
        Some(kind) => kind.run(settings).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // Logged once, through the configured log format, so it reaches the log pipeline.
            tracing::error!("{error:#}");
            ExitCode::FAILURE
        }
    }
}
