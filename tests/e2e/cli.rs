//! The command line outside `up`: help, configuration errors, `migrate`, `healthcheck`.

use std::process::Output;

use crate::support::{TestResult, Up, leadrelay};

fn stderr_lines(output: &Output) -> Vec<String> {
    String::from_utf8_lossy(&output.stderr)
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(str::to_owned)
        .collect()
}

#[test]
fn help_is_available_everywhere() -> TestResult {
    let commands: &[&[&str]] = &[
        &["--help"],
        &["up", "--help"],
        &["gateway", "--help"],
        &["orchestrator", "--help"],
        &["hana-adapter", "--help"],
        &["pipedrive-adapter", "--help"],
        &["salesman-adapter", "--help"],
        &["healthcheck", "--help"],
        &["migrate", "--help"],
    ];
    for args in commands {
        let output = leadrelay().args(*args).output()?;
        assert!(output.status.success(), "{args:?}");
        let text = String::from_utf8_lossy(&output.stdout);
        assert!(text.contains("Usage: leadrelay"), "{args:?}: {text}");
    }
    Ok(())
}

#[test]
fn bad_settings_stop_start_up_with_one_line_naming_the_variable() -> TestResult {
    let folder = tempfile::tempdir()?;
    let cases = [
        ("LEADRELAY_DATABASE_URL", "mysql://x"),
        ("LEADRELAY_PIPEDRIVE_RATE_LIMIT", "abc"),
        ("LEADRELAY_SALESMAN_POLL_INTERVAL", "soon"),
        ("LEADRELAY_GATEWAY_LISTEN", "everywhere"),
    ];
    for (variable, value) in cases {
        for command in ["up", "orchestrator", "gateway"] {
            let output = leadrelay()
                .arg(command)
                .current_dir(folder.path())
                .env(variable, value)
                .output()?;
            assert_eq!(
                output.status.code(),
                Some(2),
                "{command} with {variable}={value}"
            );
            let lines = stderr_lines(&output);
            assert_eq!(lines.len(), 1, "{command} with {variable}: {lines:?}");
            assert!(
                lines[0].starts_with(&format!("error: {variable}: ")),
                "{lines:?}"
            );
        }
    }
    assert!(
        !folder.path().join("data").exists(),
        "nothing is created on bad settings"
    );
    Ok(())
}

#[test]
fn the_gateway_alone_requires_a_webhook_token() -> TestResult {
    let output = leadrelay()
        .arg("gateway")
        .env("LEADRELAY_GATEWAY_LISTEN", "127.0.0.1:0")
        .output()?;
    assert_eq!(output.status.code(), Some(2));
    let lines = stderr_lines(&output);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].starts_with("error: LEADRELAY_HANA_WEBHOOK_TOKEN: required by the gateway"),
        "{lines:?}"
    );
    Ok(())
}

#[test]
fn migrate_creates_and_then_leaves_the_schema() -> TestResult {
    let folder = tempfile::tempdir()?;
    let url = format!("sqlite://{}/state/lr.db", folder.path().display());
    let first = leadrelay()
        .arg("migrate")
        .env("LEADRELAY_DATABASE_URL", &url)
        .output()?;
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let text = String::from_utf8_lossy(&first.stdout);
    // Every migration in the repository (its `.sql` files), however many there are by now.
    let mut migrations = 0;
    for entry in std::fs::read_dir(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/services/orchestrator/migrations/sqlite"
    ))? {
        if entry?.path().extension().is_some_and(|ext| ext == "sql") {
            migrations += 1;
        }
    }
    let applied = format!("applied {migrations} migration(s);");
    assert!(text.starts_with(&applied), "{applied}\n{text}");
    assert!(folder.path().join("state/lr.db").exists());

    let second = leadrelay()
        .arg("migrate")
        .env("LEADRELAY_DATABASE_URL", &url)
        .output()?;
    assert!(String::from_utf8_lossy(&second.stdout).starts_with("applied 0 migration(s);"));
    Ok(())
}

#[tokio::test]
async fn healthcheck_exits_zero_only_for_a_serving_service() -> TestResult {
    let folder = tempfile::tempdir()?;
    let up = Up::start(folder.path(), &[])?;
    let addr = up.addr("orchestrator").to_string();

    let serving = leadrelay().args(["healthcheck", &addr]).output()?;
    assert!(serving.status.success());
    assert_eq!(String::from_utf8_lossy(&serving.stdout).trim(), "SERVING");

    let named = leadrelay()
        .args([
            "healthcheck",
            &format!("http://{addr}"),
            "--service",
            "leadrelay.v1.OrchestratorService",
        ])
        .output()?;
    assert!(named.status.success());

    let unknown = leadrelay()
        .args(["healthcheck", &addr, "--service", "no.such.Service"])
        .output()?;
    assert_eq!(unknown.status.code(), Some(1));

    let closed = leadrelay()
        .args(["healthcheck", "127.0.0.1:1", "--timeout", "1"])
        .output()?;
    assert_eq!(closed.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&closed.stderr).contains("NOT_REACHABLE"));
    Ok(())
}

#[tokio::test]
async fn status_and_jobs_show_and_manage_the_sync_jobs() -> TestResult {
    let folder = tempfile::tempdir()?;
    // No adapter is configured: the jobs a webhook implies wait, pending.
    let up = Up::start(folder.path(), &[])?;
    let answer = reqwest::Client::new()
        .post(up.hana_webhook("lead.created"))
        .body(crate::hana_ingest::SEED_SAMPLE)
        .send()
        .await?;
    assert_eq!(answer.status(), 200);
    let orchestrator = format!("http://{}", up.addr("orchestrator"));
    let admin = |args: &[&str]| {
        leadrelay()
            .args(args)
            .env("LEADRELAY_ORCHESTRATOR_URL", &orchestrator)
            .output()
    };

    let status = admin(&["status"])?;
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(text.contains("events        1"), "{text}");
    assert!(text.contains("salesman   pending           1"), "{text}");
    assert!(text.contains("pipedrive  pending           1"), "{text}");
    assert!(text.contains("oldest pending job"), "{text}");

    let listed = admin(&["jobs", "list", "--state", "pending"])?;
    let text = String::from_utf8_lossy(&listed.stdout).into_owned();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "a header and two jobs: {text}");
    assert!(lines[0].starts_with("JOB"), "{text}");
    let job_id = lines[1].split_whitespace().next().ok_or("a job id")?;
    assert!(job_id.starts_with("job_"), "{text}");

    let retried = admin(&["jobs", "retry", job_id])?;
    assert!(
        retried.status.success(),
        "{}",
        String::from_utf8_lossy(&retried.stderr)
    );
    assert!(String::from_utf8_lossy(&retried.stdout).contains(job_id));
    let replayed = admin(&["jobs", "replay", "--target", "salesman"])?;
    assert_eq!(
        String::from_utf8_lossy(&replayed.stdout).trim(),
        "replayed 0 dead job(s)"
    );

    let wrong = admin(&["jobs", "list", "--state", "stuck"])?;
    assert!(!wrong.status.success());
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("unknown state 'stuck'"));
    let missing = admin(&["jobs", "retry", "job_missing"])?;
    assert!(!missing.status.success());
    assert_eq!(
        String::from_utf8_lossy(&missing.stderr).trim(),
        "error: no job job_missing"
    );
    Ok(())
}

#[tokio::test]
async fn routes_in_the_config_file_decide_the_jobs_and_a_bad_one_stops_start_up() -> TestResult {
    use leadrelay_proto::v1::{
        GetEventRequest, System, orchestrator_service_client::OrchestratorServiceClient,
    };

    let folder = tempfile::tempdir()?;
    let bad = folder.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[[routes]]\nevents = [\"lead.created\"]\ntargets = [\"pipedrive\", \"salesmen\"]\n",
    )?;
    let refused = leadrelay()
        .arg("up")
        .current_dir(folder.path())
        .env("LEADRELAY_CONFIG", &bad)
        .output()?;
    assert_eq!(refused.status.code(), Some(2));
    let stderr = stderr_lines(&refused);
    assert_eq!(stderr.len(), 1, "{stderr:?}");
    assert!(
        stderr[0].contains("bad.toml line 3") && stderr[0].contains("unknown target 'salesmen'"),
        "{stderr:?}"
    );

    let good = folder.path().join("leadrelay.toml");
    std::fs::write(
        &good,
        "[[routes]]\nevents = [\"lead.created\", \"lead.updated\"]\ntargets = [\"pipedrive\"]\n",
    )?;
    let config = good.display().to_string();
    let up = Up::start(folder.path(), &[("LEADRELAY_CONFIG", config.as_str())])?;
    let answer: serde_json::Value = reqwest::Client::new()
        .post(up.hana_webhook("lead.created"))
        .body(crate::hana_ingest::SEED_SAMPLE)
        .send()
        .await?
        .json()
        .await?;
    let mut orchestrator = OrchestratorServiceClient::new(up.channel("orchestrator").await?);
    let jobs = orchestrator
        .get_event(GetEventRequest {
            id: answer["event_id"].as_str().unwrap_or_default().to_owned(),
        })
        .await?
        .into_inner()
        .jobs;
    let targets: Vec<System> = jobs.iter().map(|job| job.target()).collect();
    assert_eq!(targets, vec![System::Pipedrive], "routed to Pipedrive only");
    Ok(())
}
