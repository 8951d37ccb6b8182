//! `docs/operations.md` tells the truth: every command of its grpcurl cookbook runs, in the order
//! written, through a real grpcurl against `leadrelay up`, and the cookbook covers every admin
//! RPC of the orchestrator.

use std::{collections::HashMap, process::Command};

use leadrelay_testkit::{pipedrive, salesman};
use wiremock::MockServer;

use crate::support::{Error, TestResult, Up, grpcurl_path};

const GUIDE: &str = include_str!("../../docs/operations.md");
const ORCHESTRATOR_PROTO: &str = include_str!("../../proto/leadrelay/v1/orchestrator.proto");

/// The cookbook's commands: the `grpcurl` lines of the `sh` blocks after its heading.
fn cookbook() -> Result<Vec<String>, Error> {
    let (_, section) = GUIDE
        .split_once("## grpcurl cookbook")
        .ok_or("docs/operations.md has no grpcurl cookbook")?;
    let mut commands = Vec::new();
    let mut in_block = false;
    for line in section.lines() {
        match line.trim() {
            "```sh" => in_block = true,
            "```" => in_block = false,
            command if in_block && command.starts_with("grpcurl ") => {
                commands.push(command.to_owned());
            }
            _ => {}
        }
    }
    Ok(commands)
}

/// Splits a command as sh would for what the cookbook uses: words, and 'single-quoted' text.
fn words(command: &str) -> Result<Vec<String>, Error> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut quoted = false;
    let mut started = false;
    for character in command.chars() {
        match character {
            '\'' => {
                quoted = !quoted;
                started = true;
            }
            ' ' if !quoted => {
                if started {
                    words.push(std::mem::take(&mut word));
                    started = false;
                }
            }
            _ => {
                word.push(character);
                started = true;
            }
        }
    }
    if quoted {
        return Err(format!("unclosed quote: {command}").into());
    }
    if started {
        words.push(word);
    }
    Ok(words)
}

/// The ids an answer hands to later commands.
fn learn_ids(answer: &serde_json::Value, ids: &mut HashMap<&'static str, String>) {
    let mut learn = |name: &'static str, value: &serde_json::Value| {
        if let Some(value) = value.as_str().filter(|value| !value.is_empty()) {
            ids.entry(name).or_insert_with(|| value.to_owned());
        }
    };
    learn("EVENT_ID", &answer["eventId"]);
    learn("LEAD_ID", &answer["lead"]["id"]);
    learn("DEAL_ID", &answer["deal"]["id"]);
    // The job to retry is the first of the latest list that has one: a waiting or dead job.
    if let Some(job) = answer["jobs"][0]["id"].as_str() {
        ids.insert("JOB_ID", job.to_owned());
    }
}

#[test]
fn the_cookbook_covers_every_orchestrator_rpc() -> TestResult {
    let commands = cookbook()?.join("\n");
    let rpcs: Vec<&str> = ORCHESTRATOR_PROTO
        .lines()
        .filter_map(|line| line.trim().strip_prefix("rpc "))
        .filter_map(|rest| rest.split('(').next())
        .collect();
    assert!(rpcs.len() >= 12, "{rpcs:?}");
    for rpc in rpcs {
        assert!(
            commands.contains(&format!("leadrelay.v1.OrchestratorService/{rpc}")),
            "the cookbook has no example of {rpc}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn every_cookbook_command_runs_against_leadrelay_up() -> TestResult {
    let pipedrive_fake = MockServer::start().await;
    pipedrive::mount_every_operation(&pipedrive_fake).await;
    let salesman_fake = MockServer::start().await;
    salesman::mount(
        &salesman_fake,
        "cookbook-login",
        "sm-cookbook-key-1",
        salesman::documented_answers,
    )
    .await;
    // Hana refuses the write-backs for good, so they are the dead letters the cookbook lists,
    // retries and replays.
    let hana_fake = MockServer::start().await;
    wiremock::Mock::given(wiremock::matchers::any())
        .respond_with(
            wiremock::ResponseTemplate::new(403)
                .set_body_json(serde_json::json!({"message": "this token may not update leads"})),
        )
        .mount(&hana_fake)
        .await;
    let folder = tempfile::tempdir()?;
    let (pipedrive_url, salesman_url) = (pipedrive_fake.uri(), salesman_fake.uri());
    let hana_url = hana_fake.uri();
    let up = Up::start(
        folder.path(),
        &[
            ("LEADRELAY_PIPEDRIVE_API_URL", pipedrive_url.as_str()),
            ("LEADRELAY_PIPEDRIVE_API_TOKEN", "pd-cookbook-token-1"),
            ("LEADRELAY_PIPEDRIVE_POLL_INTERVAL", "1h"),
            ("LEADRELAY_SALESMAN_API_URL", salesman_url.as_str()),
            ("LEADRELAY_SALESMAN_LOGIN", "cookbook-login"),
            ("LEADRELAY_SALESMAN_API_KEY", "sm-cookbook-key-1"),
            ("LEADRELAY_SALESMAN_POLL_INTERVAL", "1h"),
            ("LEADRELAY_HANA_API_URL", hana_url.as_str()),
            ("LEADRELAY_HANA_ACCESS_TOKEN", "hana-cookbook-token-1"),
        ],
    )?;
    let ports = [
        ("127.0.0.1:50051", up.addr("orchestrator").to_string()),
        ("127.0.0.1:50052", up.addr("hana-adapter").to_string()),
        ("127.0.0.1:50053", up.addr("pipedrive-adapter").to_string()),
        ("127.0.0.1:50054", up.addr("salesman-adapter").to_string()),
    ];
    let grpcurl = grpcurl_path()?;
    let mut ids: HashMap<&'static str, String> = HashMap::new();
    let mut answers: HashMap<String, Vec<serde_json::Value>> = HashMap::new();
    let commands = cookbook()?;
    assert!(commands.len() >= 30, "{commands:#?}");
    for command in &commands {
        let mut args = words(command)?;
        for arg in &mut args {
            for (documented, actual) in &ports {
                if arg == documented {
                    actual.clone_into(arg);
                }
            }
            for (placeholder, value) in &ids {
                if arg.contains(placeholder) {
                    *arg = arg.replace(placeholder, value);
                }
            }
        }
        // The write-backs die once the CRM jobs have run; wait for them, not a fixed time.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
        let (output, stdout) = loop {
            let output = Command::new(&grpcurl)
                .args(["-max-time", "20"])
                .args(&args[1..])
                .output()?;
            let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
            let waiting_for_dead =
                command.contains("JOB_STATE_DEAD") && !stdout.contains("\"jobs\"");
            if !waiting_for_dead || std::time::Instant::now() > deadline {
                break (output, stdout);
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        };
        assert!(
            output.status.success(),
            "{command}\nfailed: {stdout}{}\nlogs:\n{}",
            String::from_utf8_lossy(&output.stderr),
            up.logs()
        );
        let parsed: Vec<serde_json::Value> = serde_json::Deserializer::from_str(&stdout)
            .into_iter::<serde_json::Value>()
            .filter_map(Result::ok)
            .collect();
        for answer in &parsed {
            learn_ids(answer, &mut ids);
        }
        answers.insert(command.clone(), parsed);
    }
    // A batch answers each of its calls: the repeated body as a duplicate, the new one stored.
    let batch = answers
        .iter()
        .find(|(command, _)| command.contains("OrchestratorService/IngestHanaEvents"))
        .and_then(|(_, parsed)| parsed.first())
        .ok_or("no answer to IngestHanaEvents")?;
    let results = batch["results"].as_array().ok_or("no results")?;
    assert_eq!(results.len(), 2, "{batch}");
    assert_eq!(results[0]["stored"]["duplicate"], true, "{batch}");
    assert_eq!(
        results[0]["stored"]["eventId"].as_str(),
        ids.get("EVENT_ID").map(String::as_str),
        "the duplicate names the first event: {batch}"
    );
    assert!(
        results[1]["stored"]["eventId"].as_str().is_some_and(
            |id| id.starts_with("evt_") && Some(id) != ids.get("EVENT_ID").map(String::as_str)
        ),
        "{batch}"
    );
    // The stream answers each call under its `call_id`: the repeated body as a duplicate of the
    // first event, the new one stored.
    let streamed: HashMap<String, &serde_json::Value> = answers
        .iter()
        .find(|(command, _)| command.contains("OrchestratorService/IngestHanaStream"))
        .map(|(_, parsed)| parsed)
        .ok_or("no answer to IngestHanaStream")?
        .iter()
        .filter_map(|answer| Some((answer["callId"].as_str()?.to_owned(), &answer["result"])))
        .collect();
    assert_eq!(streamed.len(), 2, "{streamed:?}");
    assert_eq!(streamed["1"]["stored"]["duplicate"], true, "{streamed:?}");
    assert_eq!(
        streamed["1"]["stored"]["eventId"].as_str(),
        ids.get("EVENT_ID").map(String::as_str),
        "the duplicate names the first event: {streamed:?}"
    );
    assert!(
        streamed["2"]["stored"]["eventId"].as_str().is_some_and(
            |id| id.starts_with("evt_") && Some(id) != ids.get("EVENT_ID").map(String::as_str)
        ),
        "{streamed:?}"
    );
    for placeholder in ["EVENT_ID", "LEAD_ID", "DEAL_ID", "JOB_ID"] {
        assert!(
            ids.contains_key(placeholder),
            "no answer gave {placeholder}: {ids:?}"
        );
    }
    // The answers are the ones the guide describes, not just successful calls.
    let answer = |rpc: &str, request_part: &str| -> Result<&serde_json::Value, Error> {
        answers
            .iter()
            .find(|(command, _)| command.ends_with(rpc) && command.contains(request_part))
            .and_then(|(_, answers)| answers.first())
            .ok_or_else(|| format!("no answer from {rpc} with {request_part}").into())
    };
    let lead = answer("OrchestratorService/GetLead", "cookbook-1")?;
    assert_eq!(lead["lead"]["name"], "Cookbook Lead", "{lead}");
    let deal = answer("OrchestratorService/GetDeal", "ticket-1")?;
    assert_eq!(deal["deal"]["title"], "Cookbook ticket", "{deal}");
    let event = answer("OrchestratorService/GetEvent", "EVENT_ID")?;
    assert_eq!(
        event["event"]["id"].as_str(),
        ids.get("EVENT_ID").map(String::as_str)
    );
    let hana = answer(
        "127.0.0.1:50052 leadrelay.v1.CrmSyncService/GetCapabilities",
        "",
    )?;
    assert_eq!(hana["system"], "SYSTEM_HANA", "{hana}");
    let pipedrive = answer(
        "127.0.0.1:50053 leadrelay.v1.CrmSyncService/GetCapabilities",
        "",
    )?;
    assert_eq!(pipedrive["system"], "SYSTEM_PIPEDRIVE", "{pipedrive}");
    for configured in [hana, pipedrive] {
        assert_eq!(configured["configured"], true, "{configured}");
    }
    let dead = answer("OrchestratorService/ListJobs", "JOB_STATE_DEAD")?;
    assert_eq!(dead["jobs"][0]["target"], "SYSTEM_HANA", "{dead}");
    // Hana's refusals are the caller's to handle (dead letters with the message), not faults of
    // the adapter: no ERROR line for them.
    let logs = up.logs();
    let errors: Vec<&str> = logs
        .lines()
        .filter(|line| line.contains(" ERROR "))
        .collect();
    assert!(errors.is_empty(), "{errors:#?}");
    assert!(
        logs.contains("sync job failed"),
        "the runner logs each failed job"
    );
    let replayed = answer("OrchestratorService/ReplayDeadLetters", "SYSTEM_HANA")?;
    assert!(
        replayed["replayed"]
            .as_u64()
            .is_some_and(|count| count >= 1),
        "{replayed}"
    );
    Ok(())
}
