//! Hana webhooks in, stored durably: every scenario runs against SQLite and against Postgres.

use leadrelay_proto::v1::{
    DealStatus, GetDealRequest, GetEventRequest, GetLeadRequest, GetStatsRequest, JobOperation,
    ListEventsRequest, ListQuarantinedRequest, RemoteKey, System, field_value::Kind,
    get_deal_request, get_lead_request, orchestrator_service_client::OrchestratorServiceClient,
};
use leadrelay_testkit::TestDatabase;
use serde_json::{Value, json};
use tonic::transport::Channel;

use crate::support::{Error, TestResult, Up};

/// The sample body of the Hana developer document (typographic quotes made ASCII, the email
/// filled in).
pub(crate) const SEED_SAMPLE: &str = include_str!("../fixtures/hana-seed-sample.json");

const SEED_LEAD_ID: &str = "e734c76a-52ca-44f0-a21e8e1fe627c308";
const APP_ID: &str = "dbd9a5f7-b3c4-45bb-a8eb-2b8e10bff8c2";

/// Which store a scenario runs on.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Backend {
    Sqlite,
    Postgres,
}

/// `leadrelay up` on one backend, with clients for its gateway and orchestrator.
pub(crate) struct Harness {
    pub(crate) up: Up,
    pub(crate) http: reqwest::Client,
    pub(crate) orchestrator: OrchestratorServiceClient<Channel>,
    database: Option<TestDatabase>,
    _folder: tempfile::TempDir,
}

impl Harness {
    pub(crate) async fn start(backend: Backend, env: &[(&str, &str)]) -> Result<Self, Error> {
        let folder = tempfile::tempdir()?;
        let database = match backend {
            Backend::Sqlite => None,
            Backend::Postgres => Some(TestDatabase::create("e2e").await?),
        };
        let mut env: Vec<(&str, &str)> = env.to_vec();
        if let Some(database) = &database {
            env.push(("LEADRELAY_DATABASE_URL", database.url()));
        }
        let up = Up::start(folder.path(), &env)?;
        let orchestrator = OrchestratorServiceClient::new(up.channel("orchestrator").await?);
        Ok(Self {
            up,
            http: reqwest::Client::new(),
            orchestrator,
            database,
            _folder: folder,
        })
    }

    /// Posts a body to a Hana event's webhook URL; returns the status and the JSON answer.
    pub(crate) async fn post(&self, event: &str, body: &str) -> Result<(u16, Value), Error> {
        let answer = self
            .http
            .post(self.up.hana_webhook(event))
            .header("content-type", "application/json")
            .body(body.to_owned())
            .send()
            .await?;
        let status = answer.status().as_u16();
        Ok((status, answer.json().await?))
    }

    pub(crate) async fn finish(self) -> TestResult {
        drop(self.up);
        if let Some(database) = self.database {
            database.drop_database().await?;
        }
        Ok(())
    }
}

fn remote(remote_id: &str) -> RemoteKey {
    RemoteKey {
        system: System::Hana.into(),
        remote_id: remote_id.to_owned(),
    }
}

/// A Hana attribute as the webhook carries it.
fn attribute(value: &Value) -> Value {
    json!({"nomalizeData": value, "rawData": value})
}

fn lead_body(id: &str, attributes: &[(&str, Value)]) -> String {
    let mut lead = serde_json::Map::new();
    lead.insert("id".to_owned(), attribute(&json!(id)));
    for (name, value) in attributes {
        lead.insert((*name).to_owned(), attribute(value));
    }
    json!({"application": {"id": APP_ID}, "lead": lead}).to_string()
}

fn ticket_body(id: &str, attributes: &[(&str, Value)], conversation: Option<&str>) -> String {
    let mut opportunity = serde_json::Map::new();
    opportunity.insert("id".to_owned(), attribute(&json!(id)));
    for (name, value) in attributes {
        opportunity.insert((*name).to_owned(), attribute(value));
    }
    let mut body = json!({"application": {"id": APP_ID}, "opportunity": opportunity});
    if let Some(url) = conversation {
        body["conversation"] = json!({"conversationUrl": url});
    }
    body.to_string()
}

async fn seed_sample_is_stored_and_readable_by_its_hana_id(backend: Backend) -> TestResult {
    let mut harness = Harness::start(backend, &[]).await?;
    let (status, answer) = harness.post("lead.created", SEED_SAMPLE).await?;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["status"], "accepted");
    assert_eq!(answer["duplicate"], false);
    let event_id = answer["event_id"].as_str().unwrap_or_default().to_owned();
    assert!(event_id.starts_with("evt_"), "{answer}");

    let lead = harness
        .orchestrator
        .get_lead(GetLeadRequest {
            key: Some(get_lead_request::Key::Remote(remote(SEED_LEAD_ID))),
        })
        .await?
        .into_inner()
        .lead
        .ok_or("no lead")?;
    assert_eq!(lead.name, "Toan Truyen");
    assert_eq!(lead.emails, ["toan.truyen@example.com"]);
    assert_eq!(lead.phones, ["0978712200"]);
    assert_eq!(lead.source_channels, ["Youtube", "Sendo"]);
    let birthday = lead.birthday.ok_or("no birthday")?;
    assert_eq!((birthday.year, birthday.month, birthday.day), (2020, 9, 14));
    assert_eq!(
        lead.custom_fields
            .get("cf_number_kieu_so")
            .and_then(|field| field.kind.clone()),
        Some(Kind::NumberValue(1.09))
    );
    assert_eq!(
        lead.conversation_url,
        "https://bot.hana.ai/apps/dbd9a5f7-b3c4-45bb-a8eb2b8e10bff8c2/chats/5e6f3f81da043f97f8ae0c44"
    );
    assert_eq!(lead.raw.len(), 7, "every attribute is kept as received");
    let source = lead.source.ok_or("no source")?;
    assert_eq!(
        (source.app_id.as_str(), source.remote_id.as_str()),
        (APP_ID, SEED_LEAD_ID)
    );
    assert!(
        lead.external_refs
            .iter()
            .any(|link| link.remote_id == SEED_LEAD_ID)
    );

    // The same lead by LeadRelay's id, and the event with the jobs it implies.
    let by_id = harness
        .orchestrator
        .get_lead(GetLeadRequest {
            key: Some(get_lead_request::Key::Id(lead.id.clone())),
        })
        .await?
        .into_inner();
    assert_eq!(
        by_id.lead.map(|lead| lead.name),
        Some("Toan Truyen".to_owned())
    );
    let event = harness
        .orchestrator
        .get_event(GetEventRequest { id: event_id })
        .await?
        .into_inner();
    assert_eq!(
        event.event.map(|event| event.kind),
        Some("lead.created".to_owned())
    );
    let mut targets: Vec<i32> = event.jobs.iter().map(|job| job.target).collect();
    targets.sort_unstable();
    assert_eq!(targets, [System::Pipedrive as i32, System::Salesman as i32]);
    assert!(
        event
            .jobs
            .iter()
            .all(|job| job.operation == JobOperation::UpsertLead as i32)
    );
    harness.finish().await
}

async fn six_events_create_merge_and_delete(backend: Backend) -> TestResult {
    let mut harness = Harness::start(backend, &[]).await?;
    let lead_key = || GetLeadRequest {
        key: Some(get_lead_request::Key::Remote(remote("lead-1"))),
    };
    let deal_key = || GetDealRequest {
        key: Some(get_deal_request::Key::Remote(remote("ticket-1"))),
    };

    let created = lead_body(
        "lead-1",
        &[
            ("baseName", json!("Thu Hương")),
            ("baseEmail", json!("huong@example.com")),
        ],
    );
    assert_eq!(harness.post("lead.created", &created).await?.0, 200);
    let updated = lead_body(
        "lead-1",
        &[
            ("basePhonenumber", json!("+84395458994")),
            ("cf_string_ghi_chu", json!("Đã thanh toán")),
        ],
    );
    assert_eq!(harness.post("lead.updated", &updated).await?.0, 200);
    let lead = harness
        .orchestrator
        .get_lead(lead_key())
        .await?
        .into_inner()
        .lead
        .ok_or("no lead")?;
    assert_eq!(
        lead.name, "Thu Hương",
        "attributes not in the update are kept"
    );
    assert_eq!(lead.emails, ["huong@example.com"]);
    assert_eq!(lead.phones, ["+84395458994"]);
    assert_eq!(
        lead.custom_fields
            .get("cf_string_ghi_chu")
            .and_then(|field| field.kind.clone()),
        Some(Kind::StringValue("Đã thanh toán".to_owned()))
    );
    assert!(lead.deleted_at.is_none());
    assert_eq!(
        harness
            .post("lead.deleted", &lead_body("lead-1", &[]))
            .await?
            .0,
        200
    );
    let lead = harness
        .orchestrator
        .get_lead(lead_key())
        .await?
        .into_inner()
        .lead
        .ok_or("no lead")?;
    assert!(
        lead.deleted_at.is_some(),
        "a deleted lead is marked, not forgotten"
    );
    assert_eq!(lead.name, "Thu Hương");

    let url = "https://bot.hana.ai/apps/x/chats/1";
    let ticket = ticket_body(
        "ticket-1",
        &[
            ("baseName", json!("Cập nhật ticket")),
            ("leadEmail", json!("my@example.com")),
            ("dealValue", json!(1_000_000)),
        ],
        Some(url),
    );
    let (status, answer) = harness.post("ticket.created", &ticket).await?;
    assert_eq!(status, 200, "ticket.* is an alias of opportunity.*");
    let event = harness
        .orchestrator
        .get_event(GetEventRequest {
            id: answer["event_id"].as_str().unwrap_or_default().to_owned(),
        })
        .await?
        .into_inner();
    let mut operations: Vec<i32> = event.jobs.iter().map(|job| job.operation).collect();
    operations.sort_unstable();
    assert_eq!(
        operations,
        [
            JobOperation::UpsertDeal as i32,
            JobOperation::AddActivity as i32
        ]
    );

    let update = ticket_body("ticket-1", &[("dealValue", json!(2_500_000))], None);
    assert_eq!(harness.post("opportunity.updated", &update).await?.0, 200);
    let deal = harness
        .orchestrator
        .get_deal(deal_key())
        .await?
        .into_inner()
        .deal
        .ok_or("no deal")?;
    assert_eq!(deal.title, "Cập nhật ticket");
    assert_eq!(
        deal.value.map(|money| money.amount),
        Some("2500000".to_owned())
    );
    assert_eq!(
        deal.contact.map(|contact| contact.email),
        Some("my@example.com".to_owned())
    );
    assert_eq!(deal.conversation_url, url);
    assert_eq!(deal.status, DealStatus::Open as i32);

    assert_eq!(
        harness
            .post("opportunity.deleted", &ticket_body("ticket-1", &[], None))
            .await?
            .0,
        200
    );
    let deal = harness
        .orchestrator
        .get_deal(deal_key())
        .await?
        .into_inner()
        .deal
        .ok_or("no deal")?;
    assert_eq!(deal.status, DealStatus::Deleted as i32);
    assert!(deal.deleted_at.is_some());

    let stats = harness
        .orchestrator
        .get_stats(GetStatsRequest {})
        .await?
        .into_inner();
    assert_eq!(stats.events_total, 6);
    assert_eq!(stats.quarantined_total, 0);
    harness.finish().await
}

async fn a_redelivery_is_a_duplicate_and_adds_nothing(backend: Backend) -> TestResult {
    let mut harness = Harness::start(backend, &[]).await?;
    let (_, first) = harness.post("lead.created", SEED_SAMPLE).await?;
    // The same body re-serialised (other key order, no whitespace) is the same event.
    let reordered: Value = serde_json::from_str(SEED_SAMPLE)?;
    let (status, second) = harness.post("lead.created", &reordered.to_string()).await?;
    assert_eq!(status, 200);
    assert_eq!(second["duplicate"], true);
    assert_eq!(second["event_id"], first["event_id"]);

    let events = harness
        .orchestrator
        .list_events(ListEventsRequest::default())
        .await?
        .into_inner();
    assert_eq!(events.events.len(), 1);
    assert_eq!(events.events[0].duplicate_count, 1);
    let stats = harness
        .orchestrator
        .get_stats(GetStatsRequest {})
        .await?
        .into_inner();
    assert_eq!((stats.events_total, stats.duplicates_total), (1, 1));
    let jobs: u64 = stats.jobs.iter().map(|count| count.count).sum();
    assert_eq!(jobs, 2, "the duplicate added no jobs");

    // The same body for another event kind is another event.
    let (_, updated) = harness.post("lead.updated", SEED_SAMPLE).await?;
    assert_eq!(updated["duplicate"], false);
    harness.finish().await
}

/// Webhooks that arrive together travel to the orchestrator in batches; each must still get its
/// own answer: its own event, or the first one's when it repeats a body.
async fn concurrent_webhooks_each_get_their_own_answer(backend: Backend) -> TestResult {
    const LEADS: usize = 60;
    const REPEATED: usize = 20;
    let harness = Harness::start(backend, &[]).await?;
    let body = |n: usize| {
        lead_body(
            &format!("burst-{n}"),
            &[("baseName", json!(format!("Burst {n}")))],
        )
    };
    let url = harness.up.hana_webhook("lead.created");
    let mut posts = tokio::task::JoinSet::new();
    for n in (0..LEADS).chain(0..REPEATED) {
        let (http, url, body) = (harness.http.clone(), url.clone(), body(n));
        posts.spawn(async move {
            let answer = http
                .post(url)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await?;
            let status = answer.status().as_u16();
            Ok::<_, Error>((n, status, answer.json::<Value>().await?))
        });
    }
    let mut answers: Vec<Vec<Value>> = vec![Vec::new(); LEADS];
    while let Some(posted) = posts.join_next().await {
        let (n, status, answer) = posted??;
        assert_eq!(status, 200, "lead {n}: {answer}");
        answers[n].push(answer);
    }

    let mut orchestrator = harness.orchestrator.clone();
    let mut event_ids = std::collections::HashSet::new();
    for (n, answers) in answers.iter().enumerate() {
        let fresh = answers
            .iter()
            .filter(|answer| answer["duplicate"] == false)
            .count();
        assert_eq!(
            fresh, 1,
            "lead {n}: exactly one answer is not a duplicate: {answers:?}"
        );
        let event_id = answers[0]["event_id"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        assert!(
            answers
                .iter()
                .all(|answer| answer["event_id"] == event_id.as_str()),
            "lead {n}: a repeat names the first event: {answers:?}"
        );
        // The event an answer names is the one of this lead's body, not a neighbour's.
        let event = orchestrator
            .get_event(GetEventRequest {
                id: event_id.clone(),
            })
            .await?
            .into_inner()
            .event
            .ok_or("no event")?;
        assert_eq!(
            String::from_utf8(event.raw_body)?,
            body(n),
            "lead {n}: the answer names another call's event"
        );
        assert!(
            event_ids.insert(event_id),
            "lead {n}: an event id answered twice"
        );
    }
    let stats = orchestrator
        .get_stats(GetStatsRequest {})
        .await?
        .into_inner();
    assert_eq!(
        (stats.events_total, stats.duplicates_total),
        (LEADS as u64, REPEATED as u64)
    );
    harness.finish().await
}

/// The orchestrator's service, in this process, behind a router that refuses some of its methods
/// as UNIMPLEMENTED (as an orchestrator built before them does) and counts the calls each method
/// gets; a gateway in front of it.
struct OrchestratorBehindRouter {
    orchestrator: leadrelay_orchestrator::Orchestrator,
    calls: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>,
    gateway: std::net::SocketAddr,
    /// Ends the orchestrator's streams of Hana calls, as its shutdown does.
    streams_end: tokio_util::sync::CancellationToken,
    shutdown: tokio_util::sync::CancellationToken,
    _folder: tempfile::TempDir,
}

const OLD_TOKEN: &str = "old-token";

impl OrchestratorBehindRouter {
    async fn start(refused: &[&'static str]) -> Result<Self, Error> {
        Self::start_with(refused, axum::Router::new()).await
    }

    /// As [`Self::start`], with `routes` answering in the orchestrator's place.
    async fn start_with(refused: &[&'static str], routes: axum::Router) -> Result<Self, Error> {
        use axum::response::IntoResponse as _;
        use leadrelay_proto::v1::orchestrator_service_server::OrchestratorServiceServer;

        let folder = tempfile::tempdir()?;
        let url: leadrelay_runtime::config::DatabaseUrl =
            format!("sqlite://{}/old.db", folder.path().display()).parse()?;
        let store = leadrelay_orchestrator::Store::connect(&url).await?;
        store.migrate().await?;
        let streams_end = tokio_util::sync::CancellationToken::new();
        let orchestrator = leadrelay_orchestrator::Orchestrator::new(
            store,
            leadrelay_orchestrator::IngestPolicy::default(),
        )?
        .with_shutdown(streams_end.clone());
        let calls = std::sync::Arc::new(std::sync::Mutex::new(std::collections::HashMap::new()));
        let mut router = routes;
        for &method in refused {
            router = router.route(
                &format!("/leadrelay.v1.OrchestratorService/{method}"),
                axum::routing::post(move || async move {
                    tonic::Status::unimplemented(format!("unknown method {method}"))
                        .into_http::<axum::body::Body>()
                        .into_response()
                }),
            );
        }
        let counted = calls.clone();
        let router = router
            .fallback_service(OrchestratorServiceServer::new(orchestrator.clone()))
            .layer(axum::middleware::from_fn(
                move |request: axum::extract::Request, next: axum::middleware::Next| {
                    let method = request.uri().path().rsplit('/').next().unwrap_or_default();
                    if let Ok(mut calls) = counted.lock() {
                        *calls.entry(method.to_owned()).or_default() += 1;
                    }
                    next.run(request)
                },
            ));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let orchestrator_addr = listener.local_addr()?;
        tokio::spawn(async move { axum::serve(listener, router).await });

        let shutdown = tokio_util::sync::CancellationToken::new();
        let gateway = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let gateway_addr = gateway.local_addr()?;
        tokio::spawn(leadrelay_gateway::serve(
            leadrelay_gateway::GatewayConfig {
                hana_webhook_token: OLD_TOKEN.to_owned().into(),
                hana_webhook_token_previous: None,
                pipedrive_webhook: None,
                orchestrator_url: format!("http://{orchestrator_addr}").parse()?,
            },
            gateway,
            shutdown.clone(),
        ));
        Ok(Self {
            orchestrator,
            calls,
            gateway: gateway_addr,
            streams_end,
            shutdown,
            _folder: folder,
        })
    }

    /// As [`Self::start`], with an IngestHanaStream in the orchestrator's place that answers its
    /// headers at once, never reads its calls and sends `answers()` as its answers; returns once
    /// the gateway has the stream open.
    async fn start_with_unread_stream<S>(
        answers: impl Fn() -> S + Clone + Send + Sync + 'static,
    ) -> Result<Self, Error>
    where
        S: futures_util::Stream<Item = Result<axum::body::Bytes, std::io::Error>> + Send + 'static,
    {
        let stream = axum::Router::new().route(
            "/leadrelay.v1.OrchestratorService/IngestHanaStream",
            axum::routing::post(move || {
                let answers = answers();
                async move {
                    axum::response::Response::builder()
                        .header("content-type", "application/grpc")
                        .body(axum::body::Body::from_stream(answers))
                        .unwrap_or_default()
                }
            }),
        );
        let started = Self::start_with(&[], stream).await?;
        started.wait_for_call("IngestHanaStream").await?;
        // The gateway takes the stream as open once its answer's headers arrive.
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        Ok(started)
    }

    /// The calls `method` got so far.
    fn calls(&self, method: &str) -> usize {
        self.calls
            .lock()
            .map(|calls| calls.get(method).copied().unwrap_or(0))
            .unwrap_or(0)
    }

    /// Waits until `method` got a call.
    async fn wait_for_call(&self, method: &str) -> TestResult {
        self.wait_for_calls(method, 1).await
    }

    /// Waits until `method` got `count` calls.
    async fn wait_for_calls(&self, method: &str, count: usize) -> TestResult {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while self.calls(method) < count {
            if std::time::Instant::now() > deadline {
                return Err(format!(
                    "the gateway called {method} {} times, not {count}",
                    self.calls(method)
                )
                .into());
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// Posts the leads `numbers` all at once, and the body `raw` as well when given; each must be
    /// answered 200.
    async fn post_all(&self, numbers: std::ops::Range<usize>, raw: Option<&str>) -> TestResult {
        let http = reqwest::Client::new();
        let url = format!(
            "http://{}/webhooks/hana/lead.created?token={OLD_TOKEN}",
            self.gateway
        );
        let bodies = numbers
            .map(|n| {
                lead_body(
                    &format!("old-{n}"),
                    &[("baseName", json!(format!("Old {n}")))],
                )
            })
            .chain(raw.map(str::to_owned));
        let mut posts = tokio::task::JoinSet::new();
        for body in bodies {
            let (http, url) = (http.clone(), url.clone());
            posts.spawn(async move {
                let answer = http.post(url).body(body).send().await?;
                Ok::<_, Error>((answer.status().as_u16(), answer.text().await?))
            });
        }
        while let Some(posted) = posts.join_next().await {
            let (status, answer) = posted??;
            assert_eq!(status, 200, "{answer}");
        }
        Ok(())
    }

    /// Checks that the leads `numbers` are stored, each as it was sent, and that `events` events
    /// and `quarantined` calls are.
    async fn assert_stored(
        &self,
        numbers: std::ops::Range<usize>,
        events: u64,
        quarantined: u64,
    ) -> TestResult {
        use leadrelay_proto::v1::orchestrator_service_server::OrchestratorService as _;
        let stats = self
            .orchestrator
            .get_stats(tonic::Request::new(GetStatsRequest {}))
            .await?
            .into_inner();
        assert_eq!(
            (stats.events_total, stats.quarantined_total),
            (events, quarantined)
        );
        for n in numbers {
            let lead = self
                .orchestrator
                .get_lead(tonic::Request::new(GetLeadRequest {
                    key: Some(get_lead_request::Key::Remote(remote(&format!("old-{n}")))),
                }))
                .await?
                .into_inner()
                .lead
                .ok_or("no lead")?;
            assert_eq!(lead.name, format!("Old {n}"));
        }
        Ok(())
    }
}

/// An orchestrator older than the gateway (a rolling upgrade, a rollback) refuses both the
/// stream and batches with UNIMPLEMENTED: the gateway must send the same calls again one by one,
/// so that no webhook fails.
#[tokio::test]
async fn an_orchestrator_without_batches_still_gets_every_call() -> TestResult {
    let old = OrchestratorBehindRouter::start(&["IngestHanaStream", "IngestHanaEvents"]).await?;
    old.wait_for_call("IngestHanaStream").await?;
    // The 30th body is not JSON: resent, it must still reach quarantine as it was sent.
    old.post_all(0..29, Some("{\"lead\": ")).await?;
    assert!(
        old.calls("IngestHanaEvents") >= 1,
        "the gateway never tried a batch"
    );
    assert!(
        old.calls("IngestHanaEvent") >= 30,
        "the calls did not go one by one"
    );
    // Each call is sent again as it came in, not as any other call of the batch.
    old.assert_stored(0..29, 29, 1).await?;
    use leadrelay_proto::v1::orchestrator_service_server::OrchestratorService as _;
    let quarantined = old
        .orchestrator
        .list_quarantined(tonic::Request::new(ListQuarantinedRequest {
            page_size: 1,
            page_token: String::new(),
        }))
        .await?
        .into_inner();
    let call = quarantined.calls.first().ok_or("nothing quarantined")?;
    assert_eq!(call.raw_body, b"{\"lead\": ");
    assert!(
        call.reason.starts_with("the body is not valid JSON"),
        "{}",
        call.reason
    );
    old.shutdown.cancel();
    Ok(())
}

/// An orchestrator that takes batches but not the stream of calls gets every call in batches.
#[tokio::test]
async fn an_orchestrator_without_the_stream_gets_every_call_in_batches() -> TestResult {
    let old = OrchestratorBehindRouter::start(&["IngestHanaStream"]).await?;
    old.wait_for_call("IngestHanaStream").await?;
    old.post_all(0..30, None).await?;
    assert!(old.calls("IngestHanaEvents") >= 1, "no batch was sent");
    assert_eq!(old.calls("IngestHanaEvent"), 0, "calls went one by one");
    assert_eq!(
        old.calls("IngestHanaStream"),
        1,
        "the refused stream was tried again at once"
    );
    old.assert_stored(0..30, 30, 0).await?;
    old.shutdown.cancel();
    Ok(())
}

/// A stream that ends with calls written onto it and never answered (the orchestrator shut down
/// or the connection broke before it read them): each of those calls is sent again in a batch,
/// answered 200 and stored once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_an_ended_stream_left_unanswered_are_sent_again() -> TestResult {
    const LEADS: usize = 30;
    let end = std::sync::Arc::new(tokio::sync::Notify::new());
    let ending = end.clone();
    // The stream's answers end, with an error, when the test says so.
    let orchestrator = std::sync::Arc::new(
        OrchestratorBehindRouter::start_with_unread_stream(move || {
            let end = ending.clone();
            futures_util::stream::once(async move {
                end.notified().await;
                Err(std::io::Error::other("the stream ended"))
            })
        })
        .await?,
    );
    let posting = tokio::spawn({
        let orchestrator = orchestrator.clone();
        async move { orchestrator.post_all(0..LEADS, None).await }
    });
    // Every call is written onto the stream and waits; none can be answered there.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(
        orchestrator.calls("IngestHanaEvents"),
        0,
        "calls went in batches"
    );
    end.notify_waiters();
    posting.await??;
    assert!(
        orchestrator.calls("IngestHanaEvents") >= 1,
        "no call was sent again"
    );
    orchestrator
        .assert_stored(0..LEADS, LEADS as u64, 0)
        .await?;
    orchestrator.shutdown.cancel();
    Ok(())
}

/// When the orchestrator shuts down it ends the gateway's stream, after answering every call it
/// read, and the gateway opens another; webhooks on their way meanwhile are all answered 200 and
/// stored once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_orchestrator_ends_its_streams_on_shutdown_and_loses_no_call() -> TestResult {
    const LEADS: usize = 300;
    let orchestrator = std::sync::Arc::new(OrchestratorBehindRouter::start(&[]).await?);
    orchestrator.wait_for_call("IngestHanaStream").await?;
    let posting = tokio::spawn({
        let orchestrator = orchestrator.clone();
        async move { orchestrator.post_all(0..LEADS, None).await }
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        use leadrelay_proto::v1::orchestrator_service_server::OrchestratorService as _;
        let stats = orchestrator
            .orchestrator
            .get_stats(tonic::Request::new(GetStatsRequest {}))
            .await?
            .into_inner();
        if stats.events_total >= 30 {
            break;
        }
        if std::time::Instant::now() > deadline {
            return Err(format!("only {} events stored", stats.events_total).into());
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    orchestrator.streams_end.cancel();
    posting.await??;
    // The gateway saw the stream end and opened another (which ends at once: the orchestrator
    // is still shutting down).
    orchestrator.wait_for_calls("IngestHanaStream", 2).await?;
    orchestrator
        .assert_stored(0..LEADS, LEADS as u64, 0)
        .await?;
    orchestrator.shutdown.cancel();
    Ok(())
}

/// An orchestrator that takes the stream but never answers on it: the webhook is answered 503
/// once the gateway's deadline has passed, not left waiting, and the gateway gives the silent
/// stream up for a new one.
#[tokio::test]
async fn a_stream_that_never_answers_fails_each_webhook_at_its_deadline() -> TestResult {
    let orchestrator =
        OrchestratorBehindRouter::start_with_unread_stream(tokio_stream::pending).await?;

    let started = std::time::Instant::now();
    let answer = reqwest::Client::new()
        .post(format!(
            "http://{}/webhooks/hana/lead.created?token={OLD_TOKEN}",
            orchestrator.gateway
        ))
        .body(lead_body("silent-1", &[]))
        // A gateway that waited for ever would hang the test.
        .timeout(std::time::Duration::from_secs(20))
        .send()
        .await?;
    let waited = started.elapsed();
    let (status, text) = (answer.status().as_u16(), answer.text().await?);
    assert_eq!(status, 503, "{text}");
    assert!(text.contains("did not answer within 3 s"), "{text}");
    assert!(
        waited >= std::time::Duration::from_millis(2900),
        "answered after {waited:?}, before the deadline"
    );
    // The silent stream is given up for a new one.
    orchestrator.wait_for_calls("IngestHanaStream", 2).await?;
    orchestrator.shutdown.cancel();
    Ok(())
}

async fn unusable_calls_are_refused_or_quarantined(backend: Backend) -> TestResult {
    let mut harness =
        Harness::start(backend, &[("LEADRELAY_HANA_APPLICATION_IDS", APP_ID)]).await?;
    let gateway = harness.up.gateway_url();

    let wrong_token = harness
        .http
        .post(format!("{gateway}/webhooks/hana/lead.created?token=wrong"))
        .body(SEED_SAMPLE)
        .send()
        .await?;
    assert_eq!(wrong_token.status(), 401);
    let stats = harness
        .orchestrator
        .get_stats(GetStatsRequest {})
        .await?
        .into_inner();
    assert_eq!(
        (stats.events_total, stats.quarantined_total),
        (0, 0),
        "nothing stored"
    );

    let too_large = reqwest::Client::new()
        .post(harness.up.hana_webhook("lead.created"))
        .body(vec![b' '; 2 * 1024 * 1024])
        .send()
        .await?;
    assert_eq!(too_large.status(), 413);

    let cases = [
        (
            "lead.created",
            "{\"application\": {\"id\": ".to_owned(),
            "the body is not valid JSON",
        ),
        (
            "lead.created",
            lead_body("", &[("baseName", json!("No id"))]),
            "lead.created without an id",
        ),
        (
            "lead.created",
            lead_body("x", &[]).replace(APP_ID, "someone-else"),
            "application id 'someone-else' is not in LEADRELAY_HANA_APPLICATION_IDS",
        ),
        (
            "opportunity.created",
            lead_body("x", &[]),
            "opportunity.created without an id",
        ),
    ];
    for (event, body, reason) in &cases {
        let (status, answer) = harness.post(event, body).await?;
        assert_eq!(
            status, 200,
            "an authenticated call is acknowledged: {answer}"
        );
        let quarantined = harness
            .orchestrator
            .list_quarantined(ListQuarantinedRequest {
                page_size: 1,
                page_token: String::new(),
            })
            .await?
            .into_inner();
        let call = quarantined.calls.first().ok_or("nothing quarantined")?;
        assert!(
            call.reason.starts_with(reason),
            "{} does not start with {reason}",
            call.reason
        );
        assert_eq!(call.raw_body, body.as_bytes(), "the body is kept exactly");
        assert_eq!(
            Some(&call.id),
            answer["event_id"].as_str().map(str::to_owned).as_ref()
        );
    }
    let stats = harness
        .orchestrator
        .get_stats(GetStatsRequest {})
        .await?
        .into_inner();
    assert_eq!((stats.events_total, stats.quarantined_total), (0, 4));
    let page = harness
        .orchestrator
        .list_quarantined(ListQuarantinedRequest {
            page_size: 3,
            page_token: String::new(),
        })
        .await?
        .into_inner();
    assert_eq!(page.calls.len(), 3);
    let rest = harness
        .orchestrator
        .list_quarantined(ListQuarantinedRequest {
            page_size: 3,
            page_token: page.next_page_token,
        })
        .await?
        .into_inner();
    assert_eq!(rest.calls.len(), 1);
    assert!(rest.next_page_token.is_empty());
    harness.finish().await
}

async fn the_event_name_in_the_body_names_the_event(backend: Backend) -> TestResult {
    let harness = Harness::start(backend, &[]).await?;
    let mut body: Value =
        serde_json::from_str(&lead_body("lead-9", &[("baseName", json!("Named"))]))?;
    body["event_name"] = json!("lead.created");
    let answer = harness
        .http
        .post(
            harness
                .up
                .hana_webhook("lead.created")
                .replace("/lead.created", ""),
        )
        .body(body.to_string())
        .send()
        .await?;
    assert_eq!(answer.status(), 200);
    let answer: Value = answer.json().await?;
    let mut orchestrator = harness.orchestrator.clone();
    let event = orchestrator
        .get_event(GetEventRequest {
            id: answer["event_id"].as_str().unwrap_or_default().to_owned(),
        })
        .await?
        .into_inner();
    assert_eq!(
        event.event.map(|event| event.kind),
        Some("lead.created".to_owned())
    );
    harness.finish().await
}

/// During a rotation the gateway takes the new webhook token and the previous one, and nothing
/// else; the previous one stops working once it is no longer configured.
#[tokio::test]
async fn a_rotated_webhook_token_and_its_predecessor_are_both_accepted() -> TestResult {
    let rotating = Harness::start(
        Backend::Sqlite,
        &[
            ("LEADRELAY_HANA_WEBHOOK_TOKEN", "hana-token-new-2"),
            ("LEADRELAY_HANA_WEBHOOK_TOKEN_PREVIOUS", "hana-token-old-1"),
        ],
    )
    .await?;
    let gateway = rotating.up.gateway_url();
    let post = |harness: &Harness, token: &str, id: &str| {
        let request = harness
            .http
            .post(format!("{gateway}/webhooks/hana/lead.created"))
            .header("x-leadrelay-token", token)
            .body(lead_body(id, &[]));
        async move { Ok::<_, Error>(request.send().await?.status().as_u16()) }
    };
    assert_eq!(post(&rotating, "hana-token-new-2", "rot-1").await?, 200);
    assert_eq!(post(&rotating, "hana-token-old-1", "rot-2").await?, 200);
    assert_eq!(post(&rotating, "hana-token-other-3", "rot-3").await?, 401);
    assert!(
        rotating
            .up
            .logs()
            .contains("a Hana webhook came with the previous token"),
        "the gateway says Hana still uses the previous token"
    );
    let stats = rotating
        .orchestrator
        .clone()
        .get_stats(GetStatsRequest {})
        .await?
        .into_inner();
    assert_eq!(stats.events_total, 2);
    rotating.finish().await?;

    let rotated = Harness::start(
        Backend::Sqlite,
        &[("LEADRELAY_HANA_WEBHOOK_TOKEN", "hana-token-new-2")],
    )
    .await?;
    let gateway = rotated.up.gateway_url();
    let answer = rotated
        .http
        .post(format!("{gateway}/webhooks/hana/lead.created"))
        .header("x-leadrelay-token", "hana-token-old-1")
        .body(lead_body("rot-4", &[]))
        .send()
        .await?;
    assert_eq!(answer.status(), 401);
    rotated.finish().await
}

/// Declares each scenario once per backend.
macro_rules! on_both_backends {
    ($($scenario:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $scenario() -> crate::support::TestResult {
                    super::$scenario(super::Backend::Sqlite).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $scenario() -> crate::support::TestResult {
                    super::$scenario(super::Backend::Postgres).await
                }
            )*
        }
    };
}

on_both_backends!(
    seed_sample_is_stored_and_readable_by_its_hana_id,
    six_events_create_merge_and_delete,
    a_redelivery_is_a_duplicate_and_adds_nothing,
    concurrent_webhooks_each_get_their_own_answer,
    unusable_calls_are_refused_or_quarantined,
    the_event_name_in_the_body_names_the_event,
);
