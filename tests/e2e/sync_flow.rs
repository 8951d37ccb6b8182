//! The sync flows end to end: a Hana webhook into `leadrelay up`, its jobs run against fakes of
//! SalesMan and Pipedrive, and the remote ids linked to the canonical lead.

use std::time::{Duration, Instant};

use leadrelay_proto::v1::{
    GetEventRequest, GetLeadRequest, JobState, Lead, RemoteKey, RemoteKind, System,
    get_lead_request, orchestrator_service_client::OrchestratorServiceClient,
};
use leadrelay_testkit::{pipedrive, salesman};
use tonic::transport::Channel;
use wiremock::MockServer;

use crate::{
    hana_ingest::SEED_SAMPLE,
    support::{Error, TestResult, Up},
};

const PIPEDRIVE_TOKEN: &str = "pd-flow-token-17aa";
const SALESMAN_LOGIN: &str = "manager@isaler.ru";
const SALESMAN_KEY: &str = "sm-flow-key-6e02";
const SEED_LEAD_ID: &str = "e734c76a-52ca-44f0-a21e8e1fe627c308";

/// `leadrelay up` in `folder` with `env`, on the Postgres database at `database_url` or else on
/// SQLite in the folder.
fn start_on(
    folder: &std::path::Path,
    database_url: Option<&str>,
    env: &[(&str, &str)],
) -> Result<Up, Error> {
    let mut env = env.to_vec();
    if let Some(url) = database_url {
        env.push(("LEADRELAY_DATABASE_URL", url));
    }
    Up::start(folder, &env)
}

/// Posts a Hana webhook for `event`; returns the id of the stored event.
async fn post_hana(up: &Up, event: &str, body: String) -> Result<String, Error> {
    let answer: serde_json::Value = reqwest::Client::new()
        .post(up.hana_webhook(event))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await?
        .json()
        .await?;
    Ok(answer["event_id"]
        .as_str()
        .ok_or_else(|| format!("no event id in {answer}"))?
        .to_owned())
}

async fn seed_lead(orchestrator: &mut OrchestratorServiceClient<Channel>) -> Result<Lead, Error> {
    Ok(orchestrator
        .get_lead(GetLeadRequest {
            key: Some(get_lead_request::Key::Remote(RemoteKey {
                system: System::Hana.into(),
                remote_id: SEED_LEAD_ID.to_owned(),
            })),
        })
        .await?
        .into_inner()
        .lead
        .ok_or("the lead is stored")?)
}

fn remote(lead: &Lead, kind: RemoteKind) -> Option<&str> {
    lead.external_refs
        .iter()
        .find(|link| link.kind() == kind)
        .map(|link| link.remote_id.as_str())
}

async fn the_seed_lead_becomes_one_salesman_lead_and_one_pipedrive_person(
    database_url: Option<&str>,
) -> TestResult {
    let pipedrive_fake = MockServer::start().await;
    pipedrive::mount_every_operation(&pipedrive_fake).await;
    let salesman_fake = MockServer::start().await;
    let seen = salesman::mount(
        &salesman_fake,
        SALESMAN_LOGIN,
        SALESMAN_KEY,
        salesman::documented_answers,
    )
    .await;
    let folder = tempfile::tempdir()?;
    let (pipedrive_url, salesman_url) = (pipedrive_fake.uri(), salesman_fake.uri());
    let up = start_on(
        folder.path(),
        database_url,
        &[
            ("LEADRELAY_PIPEDRIVE_API_URL", pipedrive_url.as_str()),
            ("LEADRELAY_PIPEDRIVE_API_TOKEN", PIPEDRIVE_TOKEN),
            ("LEADRELAY_PIPEDRIVE_POLL_INTERVAL", "1h"),
            ("LEADRELAY_SALESMAN_API_URL", salesman_url.as_str()),
            ("LEADRELAY_SALESMAN_LOGIN", SALESMAN_LOGIN),
            ("LEADRELAY_SALESMAN_API_KEY", SALESMAN_KEY),
            ("LEADRELAY_SALESMAN_POLL_INTERVAL", "1h"),
        ],
    )?;
    let event_id = post_hana(&up, "lead.created", SEED_SAMPLE.to_owned()).await?;

    let mut orchestrator = OrchestratorServiceClient::new(up.channel("orchestrator").await?);
    let deadline = Instant::now() + Duration::from_secs(20);
    let lead = loop {
        let lead = seed_lead(&mut orchestrator).await?;
        if remote(&lead, RemoteKind::PipedrivePerson).is_some()
            && remote(&lead, RemoteKind::SalesmanLead).is_some()
        {
            break lead;
        }
        if Instant::now() > deadline {
            return Err(format!("the jobs did not finish; logs:\n{}", up.logs()).into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(remote(&lead, RemoteKind::PipedrivePerson), Some("7"));
    assert_eq!(remote(&lead, RemoteKind::SalesmanLead), Some("940"));
    let jobs = orchestrator
        .get_event(GetEventRequest { id: event_id })
        .await?
        .into_inner()
        .jobs;
    assert_eq!(jobs.len(), 2);
    assert!(
        jobs.iter().all(|job| job.state() == JobState::Done),
        "{jobs:?}"
    );

    let adds = salesman::calls(&seen, "add");
    assert_eq!(adds, 1, "one SalesMan lead");
    let created_persons = pipedrive_fake
        .received_requests()
        .await
        .unwrap_or_default()
        .iter()
        .filter(|request| {
            request.method.as_str() == "POST" && request.url.path() == "/api/v2/persons"
        })
        .count();
    assert_eq!(
        created_persons, 0,
        "the person Pipedrive already had is found, not created"
    );
    pipedrive::assert_requests_conform(&pipedrive_fake, PIPEDRIVE_TOKEN).await;
    Ok(())
}

/// Waits until `check` holds for the jobs of `event_id`, or fails with the logs.
async fn wait_for_jobs(
    up: &Up,
    event_id: &str,
    check: impl Fn(&[leadrelay_proto::v1::Job]) -> bool,
) -> Result<Vec<leadrelay_proto::v1::Job>, Error> {
    let mut orchestrator = OrchestratorServiceClient::new(up.channel("orchestrator").await?);
    // Long enough for a job failing four times in a row (1 + 2 + 4 + 8 s of backoff).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let jobs = orchestrator
            .get_event(GetEventRequest {
                id: event_id.to_owned(),
            })
            .await?
            .into_inner()
            .jobs;
        if check(&jobs) {
            return Ok(jobs);
        }
        if Instant::now() > deadline {
            return Err(format!("jobs stuck at {jobs:?}; logs:\n{}", up.logs()).into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The JSON bodies the Hana fake has received, once `arrived` holds for them; fails with the logs
/// after 20 s.
pub(crate) async fn hana_bodies_once(
    up: &Up,
    hana_fake: &MockServer,
    arrived: impl Fn(&[serde_json::Value]) -> bool,
) -> Result<Vec<serde_json::Value>, Error> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let bodies: Vec<serde_json::Value> = hana_fake
            .received_requests()
            .await
            .unwrap_or_default()
            .iter()
            .map(|request| serde_json::from_slice(&request.body).unwrap_or_default())
            .collect();
        if arrived(&bodies) {
            return Ok(bodies);
        }
        if Instant::now() > deadline {
            return Err(format!("Hana got {bodies:?}; logs:\n{}", up.logs()).into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn failures_retry_or_dead_letter_with_the_crm_s_message_and_replay_finishes_them(
    database_url: Option<&str>,
) -> TestResult {
    use std::sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    };

    use leadrelay_proto::v1::ReplayDeadLettersRequest;
    use serde_json::json;

    // SalesMan fails the first add with HTTP 500 (transient), then refuses with 405 (permanent)
    // until the operator fixes it; from the third add on it accepts.
    let adds = Arc::new(AtomicUsize::new(0));
    let salesman_fake = MockServer::start().await;
    salesman::mount(&salesman_fake, SALESMAN_LOGIN, SALESMAN_KEY, {
        let adds = adds.clone();
        move |fields| match fields.get("action").map(String::as_str) {
            Some("add") => match adds.fetch_add(1, Ordering::SeqCst) {
                0 => wiremock::ResponseTemplate::new(500),
                1 => salesman::v1(
                    &json!({"error":{"code":"405","text":"Не передан обязательный параметр"}}),
                ),
                _ => salesman::v1(&json!({"result":{"text":"Success","id":941}})),
            },
            _ => salesman::documented_answers(fields),
        }
    })
    .await;
    let folder = tempfile::tempdir()?;
    let salesman_url = salesman_fake.uri();
    let up = start_on(
        folder.path(),
        database_url,
        &[
            ("LEADRELAY_SALESMAN_API_URL", salesman_url.as_str()),
            ("LEADRELAY_SALESMAN_LOGIN", SALESMAN_LOGIN),
            ("LEADRELAY_SALESMAN_API_KEY", SALESMAN_KEY),
            ("LEADRELAY_SALESMAN_POLL_INTERVAL", "1h"),
        ],
    )?;
    let event_id = post_hana(&up, "lead.created", SEED_SAMPLE.to_owned()).await?;
    let salesman_job = |jobs: &[leadrelay_proto::v1::Job]| {
        jobs.iter()
            .find(|job| job.target() == System::Salesman)
            .cloned()
    };

    // The 500 is retried after its backoff; the 405 that follows is a dead letter with the text.
    let jobs = wait_for_jobs(&up, &event_id, |jobs| {
        salesman_job(jobs).is_some_and(|job| job.state() == JobState::Dead)
    })
    .await?;
    let dead = salesman_job(&jobs).ok_or("a SalesMan job")?;
    assert_eq!(dead.attempts, 2, "one retry, then the permanent error");
    assert!(
        dead.last_error.contains("Не передан обязательный параметр"),
        "{}",
        dead.last_error
    );
    // The Pipedrive job waits: Pipedrive is not configured, so nothing runs it.
    assert!(
        jobs.iter()
            .any(|job| job.target() == System::Pipedrive && job.state() == JobState::Pending)
    );

    // The cause is fixed; replaying the dead letters finishes the job.
    let mut orchestrator = OrchestratorServiceClient::new(up.channel("orchestrator").await?);
    let listed = orchestrator
        .list_jobs(leadrelay_proto::v1::ListJobsRequest {
            state: JobState::Dead.into(),
            target: System::Salesman.into(),
            page_size: 10,
            page_token: String::new(),
        })
        .await?
        .into_inner()
        .jobs;
    assert_eq!(
        listed.iter().map(|job| job.id.as_str()).collect::<Vec<_>>(),
        vec![dead.id.as_str()]
    );
    let replayed = orchestrator
        .replay_dead_letters(ReplayDeadLettersRequest {
            target: System::Salesman.into(),
            limit: 0,
        })
        .await?
        .into_inner()
        .replayed;
    assert_eq!(replayed, 1);
    wait_for_jobs(&up, &event_id, |jobs| {
        salesman_job(jobs).is_some_and(|job| job.state() == JobState::Done)
    })
    .await?;
    let lead = seed_lead(&mut orchestrator).await?;
    assert_eq!(remote(&lead, RemoteKind::SalesmanLead), Some("941"));
    assert_eq!(adds.load(Ordering::SeqCst), 3);
    Ok(())
}

async fn a_deal_won_in_pipedrive_is_written_back_to_the_hana_ticket(
    database_url: Option<&str>,
) -> TestResult {
    use serde_json::json;
    use wiremock::{Mock, ResponseTemplate, matchers::method};

    const HOOK_USER: &str = "pipedrive-hook";
    const HOOK_PASSWORD: &str = "pd-hook-secret-3c";
    const HANA_TOKEN: &str = "hana-flow-token-9d";
    const TICKET: &str = "7ad14152-9be8-442d-bf0f-33c94b5db16d";

    let pipedrive_fake = MockServer::start().await;
    pipedrive::mount_every_operation(&pipedrive_fake).await;
    let hana_fake = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"success": true})))
        .mount(&hana_fake)
        .await;
    let folder = tempfile::tempdir()?;
    let pipedrive_url = pipedrive_fake.uri();
    let hana_url = format!("{}/update", hana_fake.uri());
    let up = start_on(
        folder.path(),
        database_url,
        &[
            ("LEADRELAY_PIPEDRIVE_API_URL", pipedrive_url.as_str()),
            ("LEADRELAY_PIPEDRIVE_API_TOKEN", PIPEDRIVE_TOKEN),
            ("LEADRELAY_PIPEDRIVE_WEBHOOK_USER", HOOK_USER),
            ("LEADRELAY_PIPEDRIVE_WEBHOOK_PASSWORD", HOOK_PASSWORD),
            ("LEADRELAY_PIPEDRIVE_POLL_INTERVAL", "1h"),
            ("LEADRELAY_HANA_API_URL", hana_url.as_str()),
            ("LEADRELAY_HANA_ACCESS_TOKEN", HANA_TOKEN),
        ],
    )?;
    let http = reqwest::Client::new();
    // A Hana ticket becomes Pipedrive deal 5 (the fake's id).
    let ticket = json!({
        "application": {"id": "dbd9a5f7-b3c4-45bb-a8eb-2b8e10bff8c2"},
        "opportunity": {
            "id": {"nomalizeData": TICKET, "rawData": TICKET},
            "baseName": {"nomalizeData": "Deal 5", "rawData": "Deal 5"}
        }
    });
    let event_id = post_hana(&up, "ticket.created", ticket.to_string()).await?;
    wait_for_jobs(&up, &event_id, |jobs| {
        !jobs.is_empty() && jobs.iter().all(|job| job.state() == JobState::Done)
    })
    .await?;

    // Sales marks it won in Pipedrive; the webhook comes in.
    let won = json!({
        "data": {"id": 5, "status": "won", "stage_id": 4, "pipeline_id": 1, "title": "Deal 5"},
        "previous": {"status": "open"},
        "meta": {"action": "change", "entity": "deal", "entity_id": "5",
                 "id": "b1e0-meta", "timestamp": "2026-11-29T10:00:00Z", "version": "2.0"}
    });
    let stored = http
        .post(format!("{}/webhooks/pipedrive", up.gateway_url()))
        .basic_auth(HOOK_USER, Some(HOOK_PASSWORD))
        .json(&won)
        .send()
        .await?;
    assert_eq!(stored.status(), 200);

    let updates = hana_bodies_once(&up, &hana_fake, |bodies| {
        bodies
            .iter()
            .any(|body| body["opportunity"]["cf_string_deal_status"] == "won")
    })
    .await?;
    // The new Pipedrive deal's id is written back once the deal exists, then the win; when the
    // win arrives while the first write-back still waits, the two fold into one call.
    let won = json!({"opportunity": {"id": TICKET, "cf_string_pipedrive_deal_id": "5",
                                     "cf_string_deal_status": "won", "cf_string_deal_stage_id": "4"}});
    assert_eq!(updates.last(), Some(&won), "{updates:?}");
    assert!(updates.len() <= 2, "{updates:?}");
    assert!(
        updates
            .iter()
            .all(|body| body["opportunity"]["cf_string_pipedrive_deal_id"] == "5"),
        "{updates:?}"
    );
    Ok(())
}

async fn the_config_file_s_mappings_fill_the_crm_fields_and_name_the_hana_attributes(
    database_url: Option<&str>,
) -> TestResult {
    use leadrelay_testkit::pipedrive::crm::Crm;
    use serde_json::json;
    use wiremock::{Mock, ResponseTemplate, matchers::method};

    const SOURCES_KEY: &str = "0a1b2c3d4e5f60718293a4b5c6d7e8f901234567";
    const NUMBER_KEY: &str = "fedcba9876543210fedcba9876543210fedcba98";
    let pipedrive_fake = MockServer::start().await;
    let crm = Crm::new();
    crm.mount(&pipedrive_fake).await;
    let salesman_fake = MockServer::start().await;
    let seen = salesman::mount(
        &salesman_fake,
        SALESMAN_LOGIN,
        SALESMAN_KEY,
        salesman::documented_answers,
    )
    .await;
    let hana_fake = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"success": true})))
        .mount(&hana_fake)
        .await;
    let folder = tempfile::tempdir()?;
    let config = folder.path().join("leadrelay.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[mappings.pipedrive.person]
baseSourceInput = "{SOURCES_KEY}"
cf_number_kieu_so = "{NUMBER_KEY}"

[mappings.salesman]
baseSourceInput = "utm_campaign"
cf_number_kieu_so = "company"

[mappings.hana]
pipedrive_person_id = "cf_string_ma_pipedrive"
salesman_lead_id = ""
"#
        ),
    )?;
    let (pipedrive_url, salesman_url) = (pipedrive_fake.uri(), salesman_fake.uri());
    let hana_url = format!("{}/update", hana_fake.uri());
    let config = config.to_string_lossy().into_owned();
    let up = start_on(
        folder.path(),
        database_url,
        &[
            ("LEADRELAY_CONFIG", config.as_str()),
            ("LEADRELAY_PIPEDRIVE_API_URL", pipedrive_url.as_str()),
            ("LEADRELAY_PIPEDRIVE_API_TOKEN", PIPEDRIVE_TOKEN),
            ("LEADRELAY_PIPEDRIVE_POLL_INTERVAL", "1h"),
            ("LEADRELAY_SALESMAN_API_URL", salesman_url.as_str()),
            ("LEADRELAY_SALESMAN_LOGIN", SALESMAN_LOGIN),
            ("LEADRELAY_SALESMAN_API_KEY", SALESMAN_KEY),
            ("LEADRELAY_SALESMAN_POLL_INTERVAL", "1h"),
            ("LEADRELAY_HANA_API_URL", hana_url.as_str()),
            ("LEADRELAY_HANA_ACCESS_TOKEN", "hana-map-token-0f"),
        ],
    )?;
    let event_id = post_hana(&up, "lead.created", SEED_SAMPLE.to_owned()).await?;
    wait_for_jobs(&up, &event_id, all_finished).await?;

    let person_id = {
        let records = crm.records();
        assert_eq!(records.persons.len(), 1);
        let (&id, person) = records.persons.iter().next().ok_or("a person")?;
        assert_eq!(
            person["custom_fields"],
            json!({SOURCES_KEY: "Youtube, Sendo", NUMBER_KEY: 1.09}),
            "{person}"
        );
        id
    };
    let added = seen
        .lock()
        .map(|seen| {
            seen.iter()
                .find(|fields| fields.get("action").map(String::as_str) == Some("add"))
                .cloned()
        })
        .ok()
        .flatten()
        .ok_or("a SalesMan add")?;
    assert_eq!(
        added.get("utm_campaign").map(String::as_str),
        Some("Youtube, Sendo")
    );
    assert_eq!(added.get("company").map(String::as_str), Some("1.09"));

    // The write-back goes to the mapped attribute; the SalesMan id, mapped to "", is not written.
    let bodies = hana_bodies_once(&up, &hana_fake, |bodies| {
        bodies.last().is_some_and(|last| {
            last["lead"]["cf_string_ma_pipedrive"] == json!(person_id.to_string())
        })
    })
    .await?;
    assert!(
        bodies
            .iter()
            .all(|body| body["lead"].as_object().is_some_and(|lead| lead
                .keys()
                .all(|key| key == "id" || key == "cf_string_ma_pipedrive"))),
        "{bodies:?}"
    );
    assert!(crm.problems().is_empty(), "{:#?}", crm.problems());
    pipedrive::assert_requests_conform(&pipedrive_fake, PIPEDRIVE_TOKEN).await;
    Ok(())
}

async fn a_pipedrive_400_is_a_dead_letter_with_its_message_and_a_replay_after_the_fix_is_done(
    database_url: Option<&str>,
) -> TestResult {
    use std::sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    };

    use leadrelay_proto::v1::{ListJobsRequest, ReplayDeadLettersRequest};
    use leadrelay_testkit::pipedrive::crm::{Crm, Fault};

    const REFUSAL: &str = "Person field 'name' is required";
    // Pipedrive refuses every new person until the account is fixed.
    let fixed = Arc::new(AtomicBool::new(false));
    let crm = Crm::with_faults(Box::new({
        let fixed = fixed.clone();
        move |_, request| {
            let creates_person =
                request.method.as_str() == "POST" && request.url.path() == "/api/v2/persons";
            if creates_person && !fixed.load(Ordering::SeqCst) {
                Fault::Refused(REFUSAL)
            } else {
                Fault::None
            }
        }
    }));
    let pipedrive_fake = MockServer::start().await;
    crm.mount(&pipedrive_fake).await;
    let folder = tempfile::tempdir()?;
    let pipedrive_url = pipedrive_fake.uri();
    let up = start_on(
        folder.path(),
        database_url,
        &[
            ("LEADRELAY_PIPEDRIVE_API_URL", pipedrive_url.as_str()),
            ("LEADRELAY_PIPEDRIVE_API_TOKEN", PIPEDRIVE_TOKEN),
            ("LEADRELAY_PIPEDRIVE_POLL_INTERVAL", "1h"),
        ],
    )?;
    let event_id = post_hana(&up, "lead.created", SEED_SAMPLE.to_owned()).await?;
    let pipedrive_job = |jobs: &[leadrelay_proto::v1::Job]| {
        jobs.iter()
            .find(|job| job.target() == System::Pipedrive)
            .cloned()
    };
    let jobs = wait_for_jobs(&up, &event_id, |jobs| {
        pipedrive_job(jobs).is_some_and(|job| job.state() == JobState::Dead)
    })
    .await?;
    let dead = pipedrive_job(&jobs).ok_or("a Pipedrive job")?;
    assert_eq!(dead.attempts, 1, "a 400 is not retried");
    assert!(dead.last_error.contains(REFUSAL), "{}", dead.last_error);

    fixed.store(true, Ordering::SeqCst);
    let mut orchestrator = OrchestratorServiceClient::new(up.channel("orchestrator").await?);
    let listed = orchestrator
        .list_jobs(ListJobsRequest {
            state: JobState::Dead.into(),
            target: System::Pipedrive.into(),
            page_size: 10,
            page_token: String::new(),
        })
        .await?
        .into_inner()
        .jobs;
    assert_eq!(listed.len(), 1);
    let replayed = orchestrator
        .replay_dead_letters(ReplayDeadLettersRequest {
            target: System::Pipedrive.into(),
            limit: 0,
        })
        .await?
        .into_inner()
        .replayed;
    assert_eq!(replayed, 1);
    wait_for_jobs(&up, &event_id, |jobs| {
        pipedrive_job(jobs).is_some_and(|job| job.state() == JobState::Done)
    })
    .await?;
    assert_eq!(crm.records().persons.len(), 1);
    let lead = seed_lead(&mut orchestrator).await?;
    assert!(remote(&lead, RemoteKind::PipedrivePerson).is_some());
    assert!(crm.problems().is_empty(), "{:#?}", crm.problems());
    Ok(())
}

/// Whether every job of an event has finished: done, or folded into a job that was.
fn all_finished(jobs: &[leadrelay_proto::v1::Job]) -> bool {
    !jobs.is_empty()
        && jobs
            .iter()
            .all(|job| matches!(job.state(), JobState::Done | JobState::Coalesced))
}

async fn a_ticket_becomes_one_deal_and_one_activity_a_burst_one_patch_and_a_delete_a_lost_deal(
    database_url: Option<&str>,
) -> TestResult {
    use leadrelay_testkit::pipedrive::crm::Crm;
    use serde_json::json;

    const TICKET: &str = "4f0c1d2e-77aa-4b1c-9e3d-5a6b7c8d9e0f";
    let pipedrive_fake = MockServer::start().await;
    let crm = Crm::new();
    crm.mount(&pipedrive_fake).await;
    let folder = tempfile::tempdir()?;
    let pipedrive_url = pipedrive_fake.uri();
    let up = start_on(
        folder.path(),
        database_url,
        &[
            ("LEADRELAY_PIPEDRIVE_API_URL", pipedrive_url.as_str()),
            ("LEADRELAY_PIPEDRIVE_API_TOKEN", PIPEDRIVE_TOKEN),
            ("LEADRELAY_PIPEDRIVE_POLL_INTERVAL", "1h"),
        ],
    )?;
    let seed: serde_json::Value = serde_json::from_str(SEED_SAMPLE)?;
    let ticket = |attributes: serde_json::Value| {
        let mut opportunity = json!({"id": {"nomalizeData": TICKET, "rawData": TICKET}});
        if let (Some(all), Some(more)) = (opportunity.as_object_mut(), attributes.as_object()) {
            for (name, value) in more {
                all.insert(
                    name.clone(),
                    json!({"nomalizeData": value, "rawData": value}),
                );
            }
        }
        json!({
            "application": seed["application"],
            "lead": {"id": seed["lead"]["id"]},
            "opportunity": opportunity,
            "conversation": seed["conversation"],
        })
        .to_string()
    };

    let lead_event = post_hana(&up, "lead.created", SEED_SAMPLE.to_owned()).await?;
    wait_for_jobs(&up, &lead_event, |jobs| {
        jobs.iter()
            .filter(|job| job.target() == System::Pipedrive)
            .all(|job| job.state() == JobState::Done)
    })
    .await?;
    let created = post_hana(
        &up,
        "ticket.created",
        ticket(json!({"baseName": "Chat ticket", "dealValue": 1_500_000, "dealCurrency": "VND"})),
    )
    .await?;
    wait_for_jobs(&up, &created, all_finished).await?;
    let (deal_id, person_id) = {
        let records = crm.records();
        assert_eq!(
            records.persons.len(),
            1,
            "one person: {:?}",
            records.persons
        );
        assert_eq!(records.deals.len(), 1, "one deal: {:?}", records.deals);
        assert_eq!(records.activities.len(), 1, "{:?}", records.activities);
        let (&person_id, person) = records.persons.iter().next().ok_or("a person")?;
        assert_eq!(person["name"], "Toan Truyen");
        let (&deal_id, deal) = records.deals.iter().next().ok_or("a deal")?;
        assert_eq!(
            deal["person_id"],
            json!(person_id),
            "the deal is the lead's"
        );
        assert_eq!(deal["title"], "Chat ticket");
        assert_eq!(deal["currency"], "VND");
        let activity = records.activities.values().next().ok_or("an activity")?;
        assert_eq!(activity["deal_id"], json!(deal_id));
        let url = seed["conversation"]["conversationUrl"]
            .as_str()
            .ok_or("the seed's conversation")?;
        assert!(
            activity["note"]
                .as_str()
                .is_some_and(|note| note.contains(url)),
            "{activity}"
        );
        (deal_id, person_id)
    };

    // Five updates in a burst: one PATCH carries the last state.
    let mut updates = Vec::new();
    for number in 1..=5 {
        let body = ticket(json!({"baseName": format!("Chat ticket, edit {number}"),
                                 "dealValue": 1_500_000 + number, "dealCurrency": "VND"}));
        updates.push(post_hana(&up, "ticket.updated", body).await?);
    }
    for event_id in &updates {
        wait_for_jobs(&up, event_id, all_finished).await?;
    }
    {
        let records = crm.records();
        let patches = records.count_writes("PATCH", &format!("/api/v2/deals/{deal_id}"));
        assert_eq!(patches, 1, "{:?}", records.writes);
        assert_eq!(records.deals[&deal_id]["title"], "Chat ticket, edit 5");
        assert_eq!(records.deals[&deal_id]["value"], json!(1_500_005));
        assert_eq!(records.count_writes("PATCH", "/api/v2/persons"), 0);
        assert_eq!(records.count_writes("POST", "/api/v2/deals"), 1);
    }

    // The ticket deleted in Hana: the deal is lost, with the reason, and kept.
    let deleted = post_hana(&up, "ticket.deleted", ticket(json!({}))).await?;
    wait_for_jobs(&up, &deleted, all_finished).await?;
    {
        let records = crm.records();
        let deal = &records.deals[&deal_id];
        assert_eq!(deal["status"], "lost");
        assert_eq!(deal["lost_reason"], "deleted in Hana");
        assert_eq!(deal["person_id"], json!(person_id));
        assert_eq!(records.deals.len(), 1);
        assert_eq!(records.activities.len(), 1, "the activity was added once");
    }
    assert!(crm.problems().is_empty(), "{:#?}", crm.problems());
    pipedrive::assert_requests_conform(&pipedrive_fake, PIPEDRIVE_TOKEN).await;
    Ok(())
}

async fn a_salesman_status_change_is_written_back_to_the_hana_lead(
    database_url: Option<&str>,
) -> TestResult {
    use std::sync::{
        Arc,
        atomic::{AtomicU8, Ordering},
    };

    use leadrelay_proto::v1::TriggerPollRequest;
    use serde_json::json;
    use wiremock::{Mock, ResponseTemplate, matchers::method};

    const HANA_TOKEN: &str = "hana-flow-token-51";
    // SalesMan lead 940 (the id the fake gives the lead it adds) is open until sales works it.
    let status = Arc::new(AtomicU8::new(0));
    let salesman_fake = MockServer::start().await;
    salesman::mount(&salesman_fake, SALESMAN_LOGIN, SALESMAN_KEY, {
        let status = status.clone();
        move |fields| match fields.get("action").map(String::as_str) {
            Some("list") if fields.get("offset").is_none_or(|offset| offset == "0") => {
                salesman::v1(
                    &json!({"data": [salesman::lead_record(940, status.load(Ordering::SeqCst))]}),
                )
            }
            _ => salesman::documented_answers(fields),
        }
    })
    .await;
    let hana_fake = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"success": true})))
        .mount(&hana_fake)
        .await;
    let folder = tempfile::tempdir()?;
    let salesman_url = salesman_fake.uri();
    let hana_url = format!("{}/update", hana_fake.uri());
    let up = start_on(
        folder.path(),
        database_url,
        &[
            ("LEADRELAY_SALESMAN_API_URL", salesman_url.as_str()),
            ("LEADRELAY_SALESMAN_LOGIN", SALESMAN_LOGIN),
            ("LEADRELAY_SALESMAN_API_KEY", SALESMAN_KEY),
            ("LEADRELAY_SALESMAN_POLL_INTERVAL", "1h"),
            ("LEADRELAY_HANA_API_URL", hana_url.as_str()),
            ("LEADRELAY_HANA_ACCESS_TOKEN", HANA_TOKEN),
        ],
    )?;
    let event_id = post_hana(&up, "lead.created", SEED_SAMPLE.to_owned()).await?;
    wait_for_jobs(&up, &event_id, |jobs| {
        jobs.iter()
            .filter(|job| job.target() != System::Pipedrive)
            .all(|job| job.state() == JobState::Done)
    })
    .await?;
    let mut orchestrator = OrchestratorServiceClient::new(up.channel("orchestrator").await?);
    let poll = TriggerPollRequest {
        system: System::Salesman.into(),
    };
    assert_eq!(
        orchestrator
            .trigger_poll(poll)
            .await?
            .into_inner()
            .events_stored,
        0,
        "a lead first seen open is only recorded"
    );

    // Sales processes the lead in SalesMan.
    status.store(2, Ordering::SeqCst);
    assert_eq!(
        orchestrator
            .trigger_poll(poll)
            .await?
            .into_inner()
            .events_stored,
        1
    );
    let lead_updates: Vec<serde_json::Value> = hana_bodies_once(&up, &hana_fake, |bodies| {
        bodies
            .iter()
            .any(|body| body["lead"]["cf_string_sales_status"] == "processed")
    })
    .await?
    .into_iter()
    .filter(|body| body.get("lead").is_some())
    .collect();
    assert_eq!(
        lead_updates.last(),
        Some(
            &json!({"lead": {"id": SEED_LEAD_ID, "cf_string_salesman_lead_id": "940",
                              "cf_string_sales_status": "processed"}})
        ),
        "{lead_updates:?}"
    );
    let lead = seed_lead(&mut orchestrator).await?;
    assert_eq!(lead.sales_status, "processed");

    // The same status seen again changes nothing.
    assert_eq!(
        orchestrator
            .trigger_poll(poll)
            .await?
            .into_inner()
            .events_stored,
        0
    );
    Ok(())
}

/// Declares each flow once per backend.
macro_rules! on_both_backends {
    ($($flow:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread")]
                async fn $flow() -> crate::support::TestResult {
                    super::$flow(None).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread")]
                async fn $flow() -> crate::support::TestResult {
                    let database = leadrelay_testkit::TestDatabase::create("flow").await?;
                    let result = super::$flow(Some(database.url())).await;
                    database.drop_database().await?;
                    result
                }
            )*
        }
    };
}

on_both_backends!(
    the_seed_lead_becomes_one_salesman_lead_and_one_pipedrive_person,
    failures_retry_or_dead_letter_with_the_crm_s_message_and_replay_finishes_them,
    a_deal_won_in_pipedrive_is_written_back_to_the_hana_ticket,
    a_ticket_becomes_one_deal_and_one_activity_a_burst_one_patch_and_a_delete_a_lost_deal,
    a_salesman_status_change_is_written_back_to_the_hana_lead,
    the_config_file_s_mappings_fill_the_crm_fields_and_name_the_hana_attributes,
    a_pipedrive_400_is_a_dead_letter_with_its_message_and_a_replay_after_the_fix_is_done,
    thirty_percent_failures_still_finish_every_job_and_duplicate_nothing,
);

async fn thirty_percent_failures_still_finish_every_job_and_duplicate_nothing(
    database_url: Option<&str>,
) -> TestResult {
    use leadrelay_testkit::pipedrive::crm::{Crm, Fault};
    use serde_json::json;

    const LEADS: usize = 12;
    // 3 of every 10 calls fail: HTTP 500 and 429 before the call is applied, and an answer held
    // back past the adapter's 1 s timeout after it is applied (the write happened; the caller
    // cannot know). No request fails twice. Which job's call lands on a failing place depends on
    // how the runner's calls interleave, and a job that kept landing there (6 failures in a row,
    // seen once in CI) outlasts any wait with its backoff (1 + 2 + … + 32 s); this way a job
    // fails at most once per request it makes.
    let failed_before = std::sync::Mutex::new(std::collections::HashSet::new());
    let crm = Crm::with_faults(Box::new(move |call, request| {
        let fault = match call % 10 {
            1 => Fault::ServerError,
            5 => Fault::SlowAnswer(Duration::from_millis(1500)),
            8 => Fault::RateLimited,
            _ => return Fault::None,
        };
        let request = (
            request.method.to_string(),
            request.url.to_string(),
            request.body.clone(),
        );
        let first_failure = failed_before
            .lock()
            .map_or(true, |mut failed| failed.insert(request));
        if first_failure { fault } else { Fault::None }
    }));
    let pipedrive_fake = MockServer::start().await;
    crm.mount(&pipedrive_fake).await;
    let folder = tempfile::tempdir()?;
    let pipedrive_url = pipedrive_fake.uri();
    let up = start_on(
        folder.path(),
        database_url,
        &[
            ("LEADRELAY_PIPEDRIVE_API_URL", pipedrive_url.as_str()),
            ("LEADRELAY_PIPEDRIVE_API_TOKEN", PIPEDRIVE_TOKEN),
            ("LEADRELAY_PIPEDRIVE_POLL_INTERVAL", "1h"),
            ("LEADRELAY_PIPEDRIVE_TIMEOUT", "1s"),
        ],
    )?;
    let started = Instant::now();
    let application = json!({"id": "dbd9a5f7-b3c4-45bb-a8eb-2b8e10bff8c2"});
    let attribute = |value: String| json!({"nomalizeData": value, "rawData": value});
    let mut events = Vec::new();
    for number in 0..LEADS {
        let lead_id = attribute(format!("lead-{number}"));
        let body = json!({
            "application": application,
            "lead": {
                "id": lead_id,
                "baseName": attribute(format!("Lead {number}")),
                "baseEmail": attribute(format!("lead{number}@example.com")),
            }
        });
        events.push(post_hana(&up, "lead.created", body.to_string()).await?);
        // Every other lead opens a ticket in the same chat.
        if number % 2 == 0 {
            let body = json!({
                "application": application,
                "lead": {"id": lead_id},
                "opportunity": {
                    "id": attribute(format!("ticket-{number}")),
                    "baseName": attribute(format!("Ticket {number}")),
                },
                "conversation": {"conversationUrl": format!("https://bot.hana.ai/apps/a/chats/{number}")},
            });
            events.push(post_hana(&up, "ticket.created", body.to_string()).await?);
        }
    }
    for event_id in &events {
        wait_for_jobs(&up, event_id, |jobs| {
            jobs.iter()
                .filter(|job| job.target() == System::Pipedrive)
                .all(|job| job.state() == JobState::Done)
        })
        .await?;
    }
    println!(
        "{LEADS} leads and {} tickets synced through {} failed or timed-out calls in {:?}",
        LEADS / 2,
        crm.faults_injected(),
        started.elapsed()
    );
    let records = crm.records();
    assert_eq!(
        records.persons.len(),
        LEADS,
        "one person per lead, none twice"
    );
    assert_eq!(records.deals.len(), LEADS / 2, "one deal per ticket");
    assert_eq!(
        records.activities.len(),
        LEADS / 2,
        "one activity per ticket"
    );
    let persons_with_deals: std::collections::HashSet<_> = records
        .deals
        .values()
        .map(|deal| deal["person_id"].clone())
        .collect();
    assert_eq!(
        persons_with_deals.len(),
        LEADS / 2,
        "each deal has its own lead's person"
    );
    assert!(
        crm.faults_injected() >= LEADS,
        "the fake did fail calls: {}",
        crm.faults_injected()
    );
    assert!(crm.problems().is_empty(), "{:#?}", crm.problems());
    Ok(())
}
