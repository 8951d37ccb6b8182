//! `leadrelay up`: five services, their health and reflection, the gateway's first answers, and
//! a clean stop.

use std::time::Duration;

use leadrelay_proto::{
    pipedrive::v1::{
        AddDealRequest, pipedrive_adapter_service_client::PipedriveAdapterServiceClient,
    },
    service_names,
    v1::{
        GetCapabilitiesRequest, ListJobsRequest, ReplayDeadLettersRequest, RetryJobRequest,
        crm_sync_service_client::CrmSyncServiceClient,
        orchestrator_service_client::OrchestratorServiceClient,
    },
};
use tokio_stream::StreamExt;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_reflection::pb::v1::{
    ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
    server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
};

use crate::support::{TestResult, Up, health};

/// Lists the services a server advertises through reflection v1.
async fn reflected_services(
    channel: tonic::transport::Channel,
) -> Result<Vec<String>, crate::support::Error> {
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::iter([request]))
        .await?
        .into_inner();
    let answer = answers.next().await.ok_or("no reflection answer")??;
    match answer.message_response {
        Some(MessageResponse::ListServicesResponse(list)) => {
            let mut names: Vec<String> = list
                .service
                .into_iter()
                .map(|service| service.name)
                .collect();
            names.sort();
            Ok(names)
        }
        other => Err(format!("unexpected reflection answer {other:?}").into()),
    }
}

#[tokio::test]
async fn every_service_is_serving_with_health_and_reflection() -> TestResult {
    let folder = tempfile::tempdir()?;
    let up = Up::start(folder.path(), &[])?;

    let expected = [
        ("orchestrator", vec![service_names::ORCHESTRATOR]),
        (
            "hana-adapter",
            vec![service_names::HANA_ADAPTER, service_names::CRM_SYNC],
        ),
        (
            "pipedrive-adapter",
            vec![service_names::PIPEDRIVE_ADAPTER, service_names::CRM_SYNC],
        ),
        (
            "salesman-adapter",
            vec![service_names::SALESMAN_ADAPTER, service_names::CRM_SYNC],
        ),
    ];
    for (service, names) in expected {
        let channel = up.channel(service).await?;
        assert_eq!(
            health(channel.clone(), "").await?,
            ServingStatus::Serving,
            "{service}"
        );
        for name in &names {
            assert_eq!(
                health(channel.clone(), name).await?,
                ServingStatus::Serving,
                "{service} {name}"
            );
        }
        let mut advertised: Vec<String> = [
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
        ]
        .iter()
        .chain(&names)
        .map(|name| (*name).to_owned())
        .collect();
        advertised.sort();
        assert_eq!(reflected_services(channel).await?, advertised, "{service}");
    }
    assert!(
        folder.path().join("data/leadrelay.db").exists(),
        "SQLite is created under ./data"
    );
    Ok(())
}

#[tokio::test]
async fn sigterm_stops_up_within_five_seconds_with_exit_code_zero() -> TestResult {
    let folder = tempfile::tempdir()?;
    let mut up = Up::start(folder.path(), &[])?;
    // Open connections, as a real deployment has, before asking it to stop. `stop_with` blocks
    // this test's runtime, so this client cannot even answer the server's GOAWAY: the worst kind
    // of peer, which the drain timeout must still bound.
    let channel = up.channel("orchestrator").await?;
    assert_eq!(health(channel.clone(), "").await?, ServingStatus::Serving);
    let ready = reqwest::get(format!("{}/readyz", up.gateway_url())).await?;
    assert_eq!(ready.status(), 200);

    let (status, took) = up.stop_with("TERM")?;
    assert_eq!(status.code(), Some(0), "logs:\n{}", up.logs());
    assert!(took < Duration::from_secs(5), "took {took:?}");
    assert!(up.logs().contains("all services stopped"), "{}", up.logs());
    Ok(())
}

#[tokio::test]
async fn the_gateway_answers_probes_and_refuses_unauthenticated_webhooks() -> TestResult {
    let folder = tempfile::tempdir()?;
    let up = Up::start(folder.path(), &[])?;
    let http = reqwest::Client::new();
    let gateway = up.gateway_url();

    let healthz = http.get(format!("{gateway}/healthz")).send().await?;
    assert_eq!(healthz.status(), 200);
    let readyz = http.get(format!("{gateway}/readyz")).send().await?;
    assert_eq!(readyz.status(), 200);

    let body = r#"{"application":{"id":"app"},"lead":{}}"#;
    for url in [
        format!("{gateway}/webhooks/hana/lead.created"),
        format!("{gateway}/webhooks/hana/lead.created?token=wrong"),
    ] {
        let answer = http.post(&url).body(body).send().await?;
        assert_eq!(answer.status(), 401, "{url}");
        assert_eq!(
            answer
                .headers()
                .get("content-type")
                .and_then(|value| value.to_str().ok()),
            Some("application/json")
        );
        let json: serde_json::Value = answer.json().await?;
        assert!(
            json["error"]
                .as_str()
                .is_some_and(|error| error.contains("token")),
            "{json}"
        );
    }
    let wrong_header = http
        .post(format!("{gateway}/webhooks/hana/lead.created"))
        .header("X-LeadRelay-Token", "wrong")
        .body(body)
        .send()
        .await?;
    assert_eq!(wrong_header.status(), 401);

    let unknown_event = http
        .post(up.hana_webhook("lead.merged"))
        .body(body)
        .send()
        .await?;
    assert_eq!(unknown_event.status(), 404);
    let json: serde_json::Value = unknown_event.json().await?;
    assert!(
        json["error"]
            .as_str()
            .is_some_and(|error| error.contains("lead.merged")),
        "{json}"
    );

    // The server closes the connection instead of reading an oversized body, so this request gets
    // a client of its own: a pooled connection would be dead for the next request.
    let too_large = reqwest::Client::new()
        .post(up.hana_webhook("lead.created"))
        .body(vec![b' '; 2 * 1024 * 1024])
        .send()
        .await?;
    assert_eq!(too_large.status(), 413);
    let json: serde_json::Value = too_large.json().await?;
    assert!(json["error"].is_string(), "{json}");

    // The Pipedrive endpoint is off until its Basic-auth credentials are configured.
    let pipedrive = http
        .post(format!("{gateway}/webhooks/pipedrive"))
        .body("{}")
        .send()
        .await?;
    assert_eq!(pipedrive.status(), 404);
    let json: serde_json::Value = pipedrive.json().await?;
    assert!(
        json["error"]
            .as_str()
            .is_some_and(|error| error.contains("LEADRELAY_PIPEDRIVE_WEBHOOK_USER")),
        "{json}"
    );
    Ok(())
}

#[tokio::test]
async fn the_webhook_token_survives_a_restart() -> TestResult {
    let folder = tempfile::tempdir()?;
    let mut first = Up::start(folder.path(), &[])?;
    let token = first.webhook_token();
    assert_eq!(token.len(), 64, "{token}");
    first.stop_with("TERM")?;

    let second = Up::start(folder.path(), &[])?;
    assert_eq!(second.webhook_token(), token);
    assert!(
        !second.logs().contains(&token),
        "the token must not be logged"
    );
    Ok(())
}

#[tokio::test]
async fn a_configured_token_is_used_and_never_printed() -> TestResult {
    let folder = tempfile::tempdir()?;
    let up = Up::start(
        folder.path(),
        &[("LEADRELAY_HANA_WEBHOOK_TOKEN", "operator-chosen-secret")],
    )?;
    assert!(
        up.webhook_url
            .ends_with("token=$LEADRELAY_HANA_WEBHOOK_TOKEN"),
        "{}",
        up.webhook_url
    );
    let answer = reqwest::Client::new()
        .post(format!("{}/webhooks/hana/lead.created", up.gateway_url()))
        .header("X-LeadRelay-Token", "operator-chosen-secret")
        .body("{}")
        .send()
        .await?;
    // Authenticated: no longer 401 (what happens next belongs to the ingest path).
    assert_ne!(answer.status(), 401);
    assert!(!up.logs().contains("operator-chosen-secret"));
    Ok(())
}

#[tokio::test]
async fn adapters_without_credentials_name_the_missing_variable() -> TestResult {
    let folder = tempfile::tempdir()?;
    let up = Up::start(folder.path(), &[])?;

    let mut pipedrive = PipedriveAdapterServiceClient::new(up.channel("pipedrive-adapter").await?);
    let status = pipedrive
        .add_deal(AddDealRequest {
            title: "Deal".to_owned(),
            ..Default::default()
        })
        .await
        .err()
        .ok_or("AddDeal must fail without a token")?;
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert_eq!(
        status.message(),
        "Pipedrive is not configured: set LEADRELAY_PIPEDRIVE_API_TOKEN"
    );

    let mut sync = CrmSyncServiceClient::new(up.channel("salesman-adapter").await?);
    let capabilities = sync
        .get_capabilities(GetCapabilitiesRequest {})
        .await?
        .into_inner();
    assert!(!capabilities.configured);
    assert_eq!(
        capabilities.missing_settings,
        [
            "LEADRELAY_SALESMAN_API_URL",
            "LEADRELAY_SALESMAN_LOGIN",
            "LEADRELAY_SALESMAN_API_KEY"
        ]
    );
    Ok(())
}

#[tokio::test]
async fn job_admin_rpcs_answer_on_an_empty_store() -> TestResult {
    let folder = tempfile::tempdir()?;
    let up = Up::start(folder.path(), &[])?;
    let mut orchestrator = OrchestratorServiceClient::new(up.channel("orchestrator").await?);
    let jobs = orchestrator
        .list_jobs(ListJobsRequest::default())
        .await?
        .into_inner();
    assert!(jobs.jobs.is_empty() && jobs.next_page_token.is_empty());
    let missing = orchestrator
        .retry_job(RetryJobRequest {
            id: "job_missing".to_owned(),
        })
        .await
        .err()
        .ok_or("no such job")?;
    assert_eq!(missing.code(), Code::NotFound);
    let replayed = orchestrator
        .replay_dead_letters(ReplayDeadLettersRequest::default())
        .await?
        .into_inner()
        .replayed;
    assert_eq!(replayed, 0);
    Ok(())
}

#[tokio::test]
async fn the_pipedrive_webhook_checks_basic_auth() -> TestResult {
    let folder = tempfile::tempdir()?;
    let up = Up::start(
        folder.path(),
        &[
            ("LEADRELAY_PIPEDRIVE_WEBHOOK_USER", "pipedrive"),
            ("LEADRELAY_PIPEDRIVE_WEBHOOK_PASSWORD", "hook-secret"),
        ],
    )?;
    let url = format!("{}/webhooks/pipedrive", up.gateway_url());
    let http = reqwest::Client::new();
    let body = r#"{"meta":{"id":"1","action":"change","entity":"deal"},"data":{"id":7}}"#;

    let anonymous = http.post(&url).body(body).send().await?;
    assert_eq!(anonymous.status(), 401);
    assert!(anonymous.headers().contains_key("www-authenticate"));
    let wrong = http
        .post(&url)
        .basic_auth("pipedrive", Some("guess"))
        .body(body)
        .send()
        .await?;
    assert_eq!(wrong.status(), 401);

    let authenticated = http
        .post(&url)
        .basic_auth("pipedrive", Some("hook-secret"))
        .body(body)
        .send()
        .await?;
    assert_eq!(authenticated.status(), 200);
    assert!(!up.logs().contains("hook-secret"));
    Ok(())
}
