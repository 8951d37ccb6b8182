//! `leadrelay status` and `leadrelay jobs list|retry|replay`: the orchestrator's admin RPCs as
//! readable tables, for an operator at a terminal. They call the orchestrator at
//! `LEADRELAY_ORCHESTRATOR_URL`.

use std::{process::ExitCode, time::Duration};

use leadrelay_proto::v1::{
    GetStatsRequest, Job, JobState, ListJobsRequest, ReplayDeadLettersRequest, RetryJobRequest,
    System, orchestrator_service_client::OrchestratorServiceClient,
};
use leadrelay_runtime::Settings;
use tonic::transport::{Channel, Endpoint};

/// `leadrelay jobs …`.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum JobsCommand {
    /// Lists jobs, oldest first.
    List {
        /// Only jobs in this state: pending, running, done, dead, coalesced.
        #[arg(long)]
        state: Option<String>,
        /// Only jobs for this target: hana, pipedrive, salesman.
        #[arg(long)]
        target: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Makes a dead or waiting job due now.
    Retry {
        /// The job's id.
        id: String,
    },
    /// Makes dead jobs due again.
    Replay {
        /// Only dead jobs for this target.
        #[arg(long)]
        target: Option<String>,
    },
}

type Failure = Box<dyn std::error::Error + Send + Sync>;

async fn orchestrator(settings: &Settings) -> Result<OrchestratorServiceClient<Channel>, Failure> {
    let url = settings
        .peers
        .orchestrator
        .as_str()
        .trim_end_matches('/')
        .to_owned();
    let channel = Endpoint::from_shared(url.clone())?
        .connect_timeout(Duration::from_secs(3))
        .timeout(Duration::from_secs(10))
        .connect()
        .await
        .map_err(|error| {
            format!(
                "cannot reach the orchestrator at {url} ({error}); set LEADRELAY_ORCHESTRATOR_URL"
            )
        })?;
    Ok(OrchestratorServiceClient::new(channel))
}

fn system(name: Option<&str>) -> Result<System, Failure> {
    Ok(match name.map(str::trim) {
        None | Some("") => System::Unspecified,
        Some("hana") => System::Hana,
        Some("pipedrive") => System::Pipedrive,
        Some("salesman") => System::Salesman,
        Some(other) => {
            return Err(
                format!("unknown target '{other}': use hana, pipedrive or salesman").into(),
            );
        }
    })
}

fn state(name: Option<&str>) -> Result<JobState, Failure> {
    Ok(match name.map(str::trim) {
        None | Some("") => JobState::Unspecified,
        Some("pending") => JobState::Pending,
        Some("running") => JobState::Running,
        Some("done") => JobState::Done,
        Some("dead") => JobState::Dead,
        Some("coalesced") => JobState::Coalesced,
        Some(other) => {
            return Err(format!(
                "unknown state '{other}': use pending, running, done, dead or coalesced"
            )
            .into());
        }
    })
}

fn lower(name: &str, prefix: &str) -> String {
    name.trim_start_matches(prefix).to_ascii_lowercase()
}

fn age(seconds: i64) -> String {
    match seconds {
        ..60 => format!("{seconds} s"),
        60..3600 => format!("{} min", seconds / 60),
        _ => format!("{} h {} min", seconds / 3600, seconds % 3600 / 60),
    }
}

fn now_seconds() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| {
            i64::try_from(elapsed.as_secs()).unwrap_or(i64::MAX)
        })
}

/// Prints jobs as a table.
fn print_jobs(jobs: &[Job]) {
    println!(
        "{:<34} {:<10} {:<13} {:<10} {:>8}  LAST ERROR",
        "JOB", "TARGET", "OPERATION", "STATE", "ATTEMPTS"
    );
    for job in jobs {
        let mut error = job.last_error.replace('\n', " ");
        if error.chars().count() > 80 {
            error = format!("{}…", error.chars().take(79).collect::<String>());
        }
        println!(
            "{:<34} {:<10} {:<13} {:<10} {:>8}  {}",
            job.id,
            lower(job.target().as_str_name(), "SYSTEM_"),
            lower(job.operation().as_str_name(), "JOB_OPERATION_"),
            lower(job.state().as_str_name(), "JOB_STATE_"),
            job.attempts,
            error
        );
    }
}

/// `leadrelay status`.
pub(crate) async fn status(settings: &Settings) -> ExitCode {
    finish(status_table(settings).await)
}

async fn status_table(settings: &Settings) -> Result<(), Failure> {
    let stats = orchestrator(settings)
        .await?
        .get_stats(GetStatsRequest {})
        .await?
        .into_inner();
    println!("events        {}", stats.events_total);
    println!("duplicates    {}", stats.duplicates_total);
    println!("quarantined   {}", stats.quarantined_total);
    match &stats.oldest_pending_job_created_at {
        Some(at) => println!(
            "oldest pending job  {} old",
            age((now_seconds() - at.seconds).max(0))
        ),
        None => println!("oldest pending job  none pending"),
    }
    println!();
    println!("{:<10} {:<10} {:>8}", "TARGET", "STATE", "JOBS");
    for count in &stats.jobs {
        println!(
            "{:<10} {:<10} {:>8}",
            lower(count.target().as_str_name(), "SYSTEM_"),
            lower(count.state().as_str_name(), "JOB_STATE_"),
            count.count
        );
    }
    Ok(())
}

/// `leadrelay jobs …`.
pub(crate) async fn jobs(settings: &Settings, command: JobsCommand) -> ExitCode {
    finish(jobs_command(settings, command).await)
}

async fn jobs_command(settings: &Settings, command: JobsCommand) -> Result<(), Failure> {
    let mut client = orchestrator(settings).await?;
    match command {
        JobsCommand::List {
            state: wanted,
            target,
            limit,
        } => {
            let answer = client
                .list_jobs(ListJobsRequest {
                    state: state(wanted.as_deref())?.into(),
                    target: system(target.as_deref())?.into(),
                    page_size: limit.clamp(1, 500),
                    page_token: String::new(),
                })
                .await?
                .into_inner();
            print_jobs(&answer.jobs);
            if !answer.next_page_token.is_empty() {
                println!("(more: raise --limit)");
            }
        }
        JobsCommand::Retry { id } => {
            let job = client
                .retry_job(RetryJobRequest { id })
                .await?
                .into_inner()
                .job
                .ok_or("the orchestrator answered without the job")?;
            print_jobs(&[job]);
        }
        JobsCommand::Replay { target } => {
            let replayed = client
                .replay_dead_letters(ReplayDeadLettersRequest {
                    target: system(target.as_deref())?.into(),
                    limit: 0,
                })
                .await?
                .into_inner()
                .replayed;
            println!("replayed {replayed} dead job(s)");
        }
    }
    Ok(())
}

fn finish(result: Result<(), Failure>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            match error.downcast_ref::<tonic::Status>() {
                Some(status) => eprintln!("error: {}", status.message()),
                None => eprintln!("error: {error}"),
            }
            ExitCode::FAILURE
        }
    }
}
