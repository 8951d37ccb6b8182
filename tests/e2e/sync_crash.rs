//! The sync engine under SIGKILL: two orchestrator replicas share one Postgres database and run
//! the jobs of 2,000 Hana events against stateful fakes of Pipedrive and SalesMan, while each
//! replica is killed with SIGKILL again and again. Afterwards every acknowledged event is stored,
//! every job is done, and the fakes hold exactly one record per lead and per ticket.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use leadrelay_proto::v1::{
    GetStatsRequest, JobState, orchestrator_service_client::OrchestratorServiceClient,
};
use leadrelay_testkit::{TestDatabase, pipedrive::crm::Crm, salesman};
use serde_json::{Value, json};
use sqlx::Connection;
use tonic::transport::Channel;
use wiremock::MockServer;

use crate::support::{Error, Service, TestResult, free_port, wait_http_ok, wait_serving};

const LEADS: usize = 1600;
/// Every fourth lead opens a ticket: 400 tickets, 2,000 events in all.
const TICKET_EVERY: usize = 4;
/// Concurrent senders, like Hana's parallel deliveries.
const SENDERS: usize = 8;
/// How long the replicas run between kills.
const BETWEEN_KILLS: Duration = Duration::from_millis(1500);
const TOKEN: &str = "sync-crash-token";
const PIPEDRIVE_TOKEN: &str = "pd-crash-token-42";
const SALESMAN_LOGIN: &str = "manager@isaler.ru";
const SALESMAN_KEY: &str = "sm-crash-key-19";

/// The lead and, for every fourth, the ticket of sender unit `number`.
fn unit(number: usize) -> (Value, Option<Value>) {
    let attribute = |value: String| json!({"nomalizeData": value, "rawData": value});
    let application = json!({"id": "crash-app"});
    let lead_id = attribute(format!("crash-lead-{number}"));
    let lead = json!({
        "application": application,
        "lead": {
            "id": lead_id,
            "baseName": attribute(format!("Lead {number}")),
            "baseEmail": attribute(format!("lead{number}@example.com")),
        }
    });
    let ticket = number.is_multiple_of(TICKET_EVERY).then(|| {
        json!({
            "application": application,
            "lead": {"id": lead_id},
            "opportunity": {
                "id": attribute(format!("crash-ticket-{number}")),
                "baseName": attribute(format!("Ticket {number}")),
            },
            "conversation": {"conversationUrl": format!("https://bot.hana.ai/apps/crash/chats/{number}")},
        })
    });
    (lead, ticket)
}

/// Posts `body` until the gateway acknowledges it (a replica down answers 5xx).
async fn deliver(http: &reqwest::Client, url: &str, body: &Value) -> Result<usize, Error> {
    let mut refused = 0;
    loop {
        match http.post(url).json(body).send().await {
            Ok(answer) if answer.status() == 200 => return Ok(refused),
            _ => {
                refused += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Waits until `service` at `listen` serves; fails with its logs.
async fn serving(listen: SocketAddr, service: &Service) -> Result<(), Error> {
    wait_serving(listen)
        .await
        .map_err(|error| format!("{error}; its logs:\n{}", service.logs()).into())
}

/// A free loopback address.
fn loopback() -> Result<String, Error> {
    Ok(format!("127.0.0.1:{}", free_port()?))
}

/// Jobs of each state, all targets.
async fn job_counts(channel: Channel) -> Result<HashMap<i32, u64>, Error> {
    let stats = OrchestratorServiceClient::new(channel)
        .get_stats(GetStatsRequest {})
        .await?
        .into_inner();
    let mut counts = HashMap::new();
    for count in stats.jobs {
        *counts.entry(count.state).or_default() += count.count;
    }
    Ok(counts)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_killed_again_and_again_lose_nothing_and_duplicate_nothing() -> TestResult {
    let database = TestDatabase::create("sync_crash").await?;
    let folder = tempfile::tempdir()?;
    let pipedrive_fake = MockServer::start().await;
    let crm = Crm::new();
    crm.mount(&pipedrive_fake).await;
    let salesman_fake = MockServer::start().await;
    let salesman_leads =
        salesman::mount_stateful(&salesman_fake, SALESMAN_LOGIN, SALESMAN_KEY).await;

    // Hana takes the write-backs: the ids of the new records, and what the Pipedrive poller
    // learns of the new deals (their stage).
    let hana_fake = MockServer::start().await;
    wiremock::Mock::given(wiremock::matchers::method("POST"))
        .respond_with(wiremock::ResponseTemplate::new(200).set_body_json(json!({"success": true})))
        .mount(&hana_fake)
        .await;
    let hana_url = format!("{}/update", hana_fake.uri());
    // The replicas come back on their addresses after each kill; every other service takes a
    // port of its own.
    let replica_listen = [loopback()?, loopback()?];
    let (pipedrive_url, salesman_url) = (pipedrive_fake.uri(), salesman_fake.uri());
    let credentials = [
        ("LEADRELAY_PIPEDRIVE_API_URL", pipedrive_url.as_str()),
        ("LEADRELAY_PIPEDRIVE_API_TOKEN", PIPEDRIVE_TOKEN),
        // The fakes have no budget: the run measures the engine, not Pipedrive's pacing.
        ("LEADRELAY_PIPEDRIVE_RATE_LIMIT", "100000/1s"),
        ("LEADRELAY_PIPEDRIVE_SEARCH_RATE_LIMIT", "100000/1s"),
        ("LEADRELAY_PIPEDRIVE_POLL_INTERVAL", "1h"),
        ("LEADRELAY_SALESMAN_API_URL", salesman_url.as_str()),
        ("LEADRELAY_SALESMAN_LOGIN", SALESMAN_LOGIN),
        ("LEADRELAY_SALESMAN_API_KEY", SALESMAN_KEY),
        ("LEADRELAY_SALESMAN_POLL_INTERVAL", "1h"),
        ("LEADRELAY_HANA_API_URL", hana_url.as_str()),
        ("LEADRELAY_HANA_ACCESS_TOKEN", "hana-crash-token-8"),
    ];
    let mut adapter_env = credentials.to_vec();
    adapter_env.extend([
        ("LEADRELAY_PIPEDRIVE_LISTEN", "127.0.0.1:0"),
        ("LEADRELAY_SALESMAN_LISTEN", "127.0.0.1:0"),
        ("LEADRELAY_HANA_LISTEN", "127.0.0.1:0"),
    ]);
    let pipedrive = Service::start(folder.path(), &["pipedrive-adapter"], &adapter_env)?;
    let salesman = Service::start(folder.path(), &["salesman-adapter"], &adapter_env)?;
    let hana = Service::start(folder.path(), &["hana-adapter"], &adapter_env)?;
    let adapter_url = |adapter: SocketAddr| format!("http://{adapter}");
    let listening = "gRPC server listening";
    let pipedrive_listen = pipedrive.listening_addr(listening).await?;
    let salesman_listen = salesman.listening_addr(listening).await?;
    let hana_listen = hana.listening_addr(listening).await?;
    let (pipedrive_adapter, salesman_adapter, hana_adapter) = (
        adapter_url(pipedrive_listen),
        adapter_url(salesman_listen),
        adapter_url(hana_listen),
    );
    let replica_env = |index: usize| {
        let listen = replica_listen[index].as_str();
        let mut env = credentials.to_vec();
        env.extend([
            ("LEADRELAY_DATABASE_URL", database.url()),
            ("LEADRELAY_ORCHESTRATOR_LISTEN", listen),
            (
                "LEADRELAY_PIPEDRIVE_ADAPTER_URL",
                pipedrive_adapter.as_str(),
            ),
            ("LEADRELAY_SALESMAN_ADAPTER_URL", salesman_adapter.as_str()),
            ("LEADRELAY_HANA_ADAPTER_URL", hana_adapter.as_str()),
            // A killed replica's claimed jobs are taken again soon after.
            ("LEADRELAY_JOB_LEASE", "3s"),
        ]);
        env
    };
    let start_replica =
        |index: usize| Service::start(folder.path(), &["orchestrator"], &replica_env(index));
    // The first replica migrates the database; the second starts on it.
    let first = start_replica(0)?;
    serving(replica_listen[0].parse()?, &first).await?;
    let second = start_replica(1)?;
    serving(replica_listen[1].parse()?, &second).await?;
    let mut replicas = [Some(first), Some(second)];
    serving(pipedrive_listen, &pipedrive).await?;
    serving(salesman_listen, &salesman).await?;
    serving(hana_listen, &hana).await?;
    // The gateway talks to replica 0; while it is down, Hana's deliveries are refused and resent.
    let replica_0 = format!("http://{}", replica_listen[0]);
    let gateway = Service::start(
        folder.path(),
        &["gateway"],
        &[
            ("LEADRELAY_GATEWAY_LISTEN", "127.0.0.1:0"),
            ("LEADRELAY_ORCHESTRATOR_URL", replica_0.as_str()),
            ("LEADRELAY_HANA_WEBHOOK_TOKEN", TOKEN),
        ],
    )?;
    let gateway_listen = gateway.listening_addr("gateway listening").await?;
    wait_http_ok(&format!("http://{gateway_listen}/healthz")).await?;

    let started = Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let refused = Arc::new(AtomicUsize::new(0));
    let mut senders = Vec::new();
    for _ in 0..SENDERS {
        let (next, refused) = (next.clone(), refused.clone());
        let base = format!("http://{gateway_listen}/webhooks/hana");
        senders.push(tokio::spawn(async move {
            let http = reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()?;
            loop {
                let number = next.fetch_add(1, Ordering::SeqCst);
                if number >= LEADS {
                    return Ok::<_, Error>(());
                }
                // A lead is acknowledged before its ticket is sent, as Hana sends them.
                let (lead, ticket) = unit(number);
                let lead_url = format!("{base}/lead.created?token={TOKEN}");
                let mut times = deliver(&http, &lead_url, &lead).await?;
                if let Some(ticket) = ticket {
                    let ticket_url = format!("{base}/ticket.created?token={TOKEN}");
                    times += deliver(&http, &ticket_url, &ticket).await?;
                }
                refused.fetch_add(times, Ordering::SeqCst);
            }
        }));
    }
    // Kill a replica every so often while events arrive, and twice more while the jobs drain.
    let mut kills = 0;
    let mut after_sent = 0;
    let mut sent_in = None;
    while after_sent < 2 {
        tokio::time::sleep(BETWEEN_KILLS).await;
        if senders.iter().all(tokio::task::JoinHandle::is_finished) {
            sent_in.get_or_insert_with(|| started.elapsed());
            after_sent += 1;
        }
        let index = kills % 2;
        if let Some(replica) = replicas[index].take() {
            replica.kill()?;
        }
        replicas[index] = Some(start_replica(index)?);
        kills += 1;
    }
    for sender in senders {
        sender.await??;
    }
    let sent_in = sent_in.unwrap_or_else(|| started.elapsed());
    for listen in &replica_listen {
        wait_serving(listen.parse()?).await?;
    }

    // Every job finishes: none pending, running or dead.
    let channel = Channel::from_shared(replica_0.clone())?.connect().await?;
    let deadline = Instant::now() + Duration::from_secs(120);
    let counts = loop {
        let counts = job_counts(channel.clone()).await?;
        let unfinished: u64 = [JobState::Pending, JobState::Running, JobState::Dead]
            .iter()
            .map(|state| counts.get(&(*state as i32)).copied().unwrap_or(0))
            .sum();
        if unfinished == 0 && !counts.is_empty() {
            break counts;
        }
        if Instant::now() > deadline {
            let logs: Vec<String> = replicas.iter().flatten().map(Service::logs).collect();
            return Err(format!("jobs unfinished: {counts:?}\n{}", logs.join("\n")).into());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let stats = OrchestratorServiceClient::new(channel.clone())
        .get_stats(GetStatsRequest {})
        .await?
        .into_inner();
    let tickets = LEADS.div_ceil(TICKET_EVERY);
    println!(
        "{} events sent in {sent_in:?} through {kills} kills ({} deliveries refused and resent); \
         all jobs done after {:?}: {counts:?}",
        LEADS + tickets,
        refused.load(Ordering::SeqCst),
        started.elapsed()
    );
    assert!(kills >= 4, "the replicas were killed {kills} times");
    let hana_events: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE source = 'hana'")
        .fetch_one(&mut sqlx::PgConnection::connect(database.url()).await?)
        .await?;
    assert_eq!(
        usize::try_from(hana_events)?,
        LEADS + tickets,
        "every Hana event stored once ({} redeliveries answered as duplicates)",
        stats.duplicates_total
    );
    {
        let records = crm.records();
        assert_eq!(
            records.persons.len(),
            LEADS,
            "one Pipedrive person per lead"
        );
        assert_eq!(records.deals.len(), tickets, "one deal per ticket");
        assert_eq!(records.activities.len(), tickets, "one activity per ticket");
    }
    let added = salesman_leads.lock().map_err(|_| "poisoned")?.clone();
    // For a lead added twice: how far apart, and how many other adds came in between (SalesMan's
    // v1 list shows only the newest 200, so the second add must come before 200 others).
    let mut first_add: HashMap<String, usize> = HashMap::new();
    let mut twice = Vec::new();
    for (index, lead) in added.iter().enumerate() {
        let email = lead.record["email"].as_str().unwrap_or_default().to_owned();
        if let Some(&first) = first_add.get(&email) {
            twice.push(format!(
                "{email}: again after {:?}, {} adds between",
                lead.at.duration_since(added[first].at),
                index - first - 1
            ));
        } else {
            first_add.insert(email, index);
        }
    }
    if !twice.is_empty() {
        let retried: Vec<(String, i64, String)> = sqlx::query_as(
            "SELECT id, attempts, last_error FROM jobs WHERE target = 'salesman' AND attempts > 1 \
             ORDER BY attempts DESC LIMIT 20",
        )
        .fetch_all(&mut sqlx::PgConnection::connect(database.url()).await?)
        .await?;
        panic!("SalesMan leads added twice: {twice:#?}\nSalesMan jobs retried: {retried:#?}");
    }
    assert_eq!(added.len(), LEADS, "one SalesMan lead per lead");
    assert!(crm.problems().is_empty(), "{:#?}", crm.problems());
    drop(replicas);
    database.drop_database().await?;
    Ok(())
}
