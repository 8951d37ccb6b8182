//! The whole flow with every credential set and debug logging on: no secret in any log line.

use std::time::{Duration, Instant};

use leadrelay_proto::v1::{
    GetStatsRequest, JobState, orchestrator_service_client::OrchestratorServiceClient,
};
use leadrelay_testkit::{TestDatabase, pipedrive::crm::Crm, salesman};
use serde_json::json;
use wiremock::{Mock, MockServer, ResponseTemplate, matchers::method};

use crate::{
    hana_ingest::SEED_SAMPLE,
    support::{TestResult, Up},
    sync_flow::hana_bodies_once,
};

const HANA_WEBHOOK_TOKEN: &str = "hana-hook-secret-5f2a9c";
const HANA_ACCESS_TOKEN: &str = "hana-access-secret-81d0e7";
const HANA_WEBHOOK_TOKEN_PREVIOUS: &str = "hana-hook-old-secret-77e0b3";
const PIPEDRIVE_TOKEN: &str = "pd-api-secret-3e77b1";
const PIPEDRIVE_HOOK_USER: &str = "pipedrive-hook";
const PIPEDRIVE_HOOK_PASSWORD: &str = "pd-hook-secret-c40f12";
const SALESMAN_LOGIN: &str = "manager@isaler.ru";
const SALESMAN_KEY: &str = "sm-api-secret-9a61d4";
/// Trust auth ignores it, but it is in the database URL LeadRelay is given.
const DATABASE_PASSWORD: &str = "pg-secret-2b8d";

#[tokio::test(flavor = "multi_thread")]
async fn no_secret_reaches_a_log_line_with_debug_logging() -> TestResult {
    let database = TestDatabase::create("secrets").await?;
    let database_url = database.url().replacen(
        "postgres://postgres@",
        &format!("postgres://postgres:{DATABASE_PASSWORD}@"),
        1,
    );
    assert!(database_url.contains(DATABASE_PASSWORD), "{database_url}");
    let pipedrive_fake = MockServer::start().await;
    let crm = Crm::new();
    crm.mount(&pipedrive_fake).await;
    let salesman_fake = MockServer::start().await;
    salesman::mount_stateful(&salesman_fake, SALESMAN_LOGIN, SALESMAN_KEY).await;
    let hana_fake = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"success": true})))
        .mount(&hana_fake)
        .await;
    let folder = tempfile::tempdir()?;
    let (pipedrive_url, salesman_url) = (pipedrive_fake.uri(), salesman_fake.uri());
    let hana_url = format!("{}/update", hana_fake.uri());
    let up = Up::start(
        folder.path(),
        &[
            ("RUST_LOG", "debug"),
            ("LEADRELAY_DATABASE_URL", database_url.as_str()),
            ("LEADRELAY_HANA_WEBHOOK_TOKEN", HANA_WEBHOOK_TOKEN),
            (
                "LEADRELAY_HANA_WEBHOOK_TOKEN_PREVIOUS",
                HANA_WEBHOOK_TOKEN_PREVIOUS,
            ),
            ("LEADRELAY_HANA_API_URL", hana_url.as_str()),
            ("LEADRELAY_HANA_ACCESS_TOKEN", HANA_ACCESS_TOKEN),
            ("LEADRELAY_PIPEDRIVE_API_URL", pipedrive_url.as_str()),
            ("LEADRELAY_PIPEDRIVE_API_TOKEN", PIPEDRIVE_TOKEN),
            ("LEADRELAY_PIPEDRIVE_WEBHOOK_USER", PIPEDRIVE_HOOK_USER),
            (
                "LEADRELAY_PIPEDRIVE_WEBHOOK_PASSWORD",
                PIPEDRIVE_HOOK_PASSWORD,
            ),
            ("LEADRELAY_PIPEDRIVE_POLL_INTERVAL", "1h"),
            ("LEADRELAY_SALESMAN_API_URL", salesman_url.as_str()),
            ("LEADRELAY_SALESMAN_LOGIN", SALESMAN_LOGIN),
            ("LEADRELAY_SALESMAN_API_KEY", SALESMAN_KEY),
            ("LEADRELAY_SALESMAN_POLL_INTERVAL", "1h"),
        ],
    )?;

    // A lead, its ticket, a Pipedrive change and a refused webhook: every credential is used.
    // The banner names a token from the environment by its variable and never prints it.
    let webhook = |event: &str, token: &str| {
        up.hana_webhook(event)
            .replace("$LEADRELAY_HANA_WEBHOOK_TOKEN", token)
    };
    let http = reqwest::Client::new();
    let seed: serde_json::Value = serde_json::from_str(SEED_SAMPLE)?;
    let ticket = json!({
        "application": seed["application"],
        "lead": {"id": seed["lead"]["id"]},
        "opportunity": {"id": {"nomalizeData": "ticket-secrets", "rawData": "ticket-secrets"}},
        "conversation": seed["conversation"],
    });
    for (event, body) in [
        ("lead.created", SEED_SAMPLE.to_owned()),
        ("ticket.created", ticket.to_string()),
    ] {
        let answer = http
            .post(webhook(event, HANA_WEBHOOK_TOKEN))
            .body(body)
            .send()
            .await?;
        assert_eq!(answer.status(), 200);
    }
    // A rotation under way: Hana still sends the previous token.
    let previous = http
        .post(webhook("lead.updated", HANA_WEBHOOK_TOKEN_PREVIOUS))
        .body(SEED_SAMPLE)
        .send()
        .await?;
    assert_eq!(previous.status(), 200);
    let refused = http
        .post(
            up.hana_webhook("lead.created")
                .replace(HANA_WEBHOOK_TOKEN, "wrong"),
        )
        .body(SEED_SAMPLE)
        .send()
        .await?;
    assert_eq!(refused.status(), 401);
    let mut orchestrator = OrchestratorServiceClient::new(up.channel("orchestrator").await?);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let stats = orchestrator
            .get_stats(GetStatsRequest {})
            .await?
            .into_inner();
        let unfinished: u64 = stats
            .jobs
            .iter()
            .filter(|count| matches!(count.state(), JobState::Pending | JobState::Running))
            .map(|count| count.count)
            .sum();
        let done: u64 = stats
            .jobs
            .iter()
            .filter(|count| count.state() == JobState::Done)
            .map(|count| count.count)
            .sum();
        if unfinished == 0 && done >= 4 {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!("jobs unfinished: {:?}\n{}", stats.jobs, up.logs()).into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let deal_id = crm
        .records()
        .deals
        .keys()
        .next()
        .copied()
        .ok_or("a deal in Pipedrive")?;
    let won = json!({
        "data": {"id": deal_id, "status": "won", "title": "Deal"},
        "previous": {"status": "open"},
        "meta": {"action": "change", "entity": "deal", "entity_id": deal_id.to_string(),
                 "id": "secrets-meta-1", "timestamp": "2026-11-29T10:00:00Z", "version": "2.0"}
    });
    let stored = http
        .post(format!("{}/webhooks/pipedrive", up.gateway_url()))
        .basic_auth(PIPEDRIVE_HOOK_USER, Some(PIPEDRIVE_HOOK_PASSWORD))
        .json(&won)
        .send()
        .await?;
    assert_eq!(stored.status(), 200);
    hana_bodies_once(&up, &hana_fake, |bodies| {
        bodies.iter().any(|body| body.to_string().contains("won"))
    })
    .await?;

    let logs = up.logs();
    assert!(
        logs.contains("DEBUG") && logs.contains("pipedrive call") && logs.contains("salesman call"),
        "debug logging is on and the CRMs were called: {logs}"
    );
    for secret in [
        HANA_WEBHOOK_TOKEN,
        HANA_WEBHOOK_TOKEN_PREVIOUS,
        HANA_ACCESS_TOKEN,
        PIPEDRIVE_TOKEN,
        PIPEDRIVE_HOOK_PASSWORD,
        SALESMAN_KEY,
        DATABASE_PASSWORD,
    ] {
        let leaks: Vec<&str> = logs.lines().filter(|line| line.contains(secret)).collect();
        assert!(leaks.is_empty(), "{secret} is in the logs: {leaks:#?}");
    }
    drop(up);
    database.drop_database().await?;
    Ok(())
}
