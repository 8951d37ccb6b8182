//! The group-commit writer: calls that share a group behave exactly as if committed one by one.

use leadrelay_orchestrator::{
    IngestPolicy, Store, StoreError,
    ingest::{HanaCall, Ingester},
    mapping::Attributes,
    queries::{self, EntityKey},
    store::Backend,
};
use leadrelay_proto::{
    json::to_proto_value,
    v1::{Deal, HanaEventKind, HanaWebhook, Lead, RawAttribute, System},
};
use leadrelay_runtime::{config::DatabaseUrl, metrics::metrics};
use leadrelay_testkit::{TestDatabase, relay::TcpRelay};

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

fn call(kind: HanaEventKind, lead_id: &str, name: &str) -> HanaCall {
    call_in("app", kind, lead_id, name)
}

/// A Hana record section: each attribute's normalised and raw values both `value`.
fn section(pairs: [(&str, &str); 2]) -> Attributes {
    pairs
        .into_iter()
        .map(|(name, value)| {
            let attribute = RawAttribute {
                normalized: Some(to_proto_value(value.into())),
                raw: Some(to_proto_value(value.into())),
            };
            (name.to_owned(), attribute)
        })
        .collect()
}

fn call_in(application_id: &str, kind: HanaEventKind, lead_id: &str, name: &str) -> HanaCall {
    let webhook = HanaWebhook {
        application_id: application_id.to_owned(),
        lead: section([("id", lead_id), ("baseName", name)]),
        ..Default::default()
    };
    let raw_body = format!(
        r#"{{"application":{{"id":"{application_id}"}},"lead":{{"id":"{lead_id}","baseName":"{name}"}}}}"#
    );
    HanaCall {
        kind,
        body: Ok(webhook),
        raw_body: raw_body.into_bytes().into(),
        received_at_ms: 1_700_000_000_000,
        trace_context: None,
    }
}

/// `opportunity.created` for the Hana ticket `ticket_id`, whose `lead` section names `lead_id`.
fn ticket(ticket_id: &str, lead_id: &str) -> HanaCall {
    let mut created = call(HanaEventKind::OpportunityCreated, lead_id, "Contact");
    if let Ok(webhook) = &mut created.body {
        webhook.opportunity = section([("id", ticket_id), ("baseName", "Ticket")]);
    }
    created.raw_body = format!(
        r#"{{"application":{{"id":"app"}},"lead":{{"id":"{lead_id}","baseName":"Contact"}},"opportunity":{{"id":"{ticket_id}","baseName":"Ticket"}}}}"#
    )
    .into_bytes()
    .into();
    created
}

/// The key an entity is found by from the Hana record `hana_id` that created it.
fn hana_key(hana_id: &str) -> EntityKey {
    EntityKey::Remote {
        system: System::Hana,
        remote_id: hana_id.to_owned(),
    }
}

/// The deal created from the Hana ticket `hana_id`, if any.
async fn deal_by_hana_id(store: &Store, hana_id: &str) -> Result<Option<Deal>, StoreError> {
    queries::get_deal(store.pool(), &hana_key(hana_id)).await
}

/// The lead created from the Hana lead `hana_id`, if any.
async fn lead_by_hana_id(store: &Store, hana_id: &str) -> Result<Option<Lead>, StoreError> {
    queries::get_lead(store.pool(), &hana_key(hana_id)).await
}

async fn calls_sharing_a_group(store: Store) -> TestResult {
    let engine = store.backend().name();
    let before = metrics().ingest_writer_totals(engine);
    let ingester =
        Ingester::start(store.clone(), IngestPolicy::default()).expect("the ingest writer starts");
    // tokio::join! polls in order, so the calls enter the writer's queue in this order; arriving
    // together they usually share a group, and the outcome must be the same whether they do or not.
    let (first, again, other, renamed, renamed_again, broken) = tokio::join!(
        ingester.ingest(call(HanaEventKind::LeadCreated, "lead-a", "First")),
        ingester.ingest(call(HanaEventKind::LeadCreated, "lead-a", "First")),
        ingester.ingest(call(HanaEventKind::LeadCreated, "lead-b", "Other")),
        ingester.ingest(call(HanaEventKind::LeadUpdated, "lead-a", "Second")),
        ingester.ingest(call(HanaEventKind::LeadUpdated, "lead-a", "Third")),
        ingester.ingest(HanaCall {
            body: Err("the body is not valid JSON".to_owned()),
            ..call(HanaEventKind::LeadCreated, "x", "x")
        }),
    );
    let (first, again, other) = (first?, again?, other?);
    assert!(!first.duplicate && !first.quarantined);
    assert!(
        again.duplicate,
        "the same body twice in one group is a duplicate"
    );
    assert_eq!(again.event_id, first.event_id);
    assert!(!other.duplicate);
    assert!(!renamed?.duplicate && !renamed_again?.duplicate);
    assert!(broken?.quarantined);

    let lead = lead_by_hana_id(&store, "lead-a")
        .await?
        .ok_or("lead-a was not stored")?;
    assert_eq!(
        lead.name, "Third",
        "events for one entity apply in arrival order"
    );
    // One lead per Hana id, however many of its events a group holds: on SQLite no constraint
    // would refuse a second (migration 0006), the writer's lookup is what prevents it.
    let leads: i64 = sqlx::query_scalar("SELECT count(*) FROM leads")
        .fetch_one(store.pool())
        .await?;
    assert_eq!(leads, 2, "lead-a and lead-b");
    let stats = queries::stats(store.pool()).await?;
    assert_eq!(
        (stats.events, stats.duplicates, stats.quarantined),
        (4, 1, 1)
    );
    let jobs: u64 = stats.jobs.iter().map(|count| count.count).sum();
    assert_eq!(
        jobs, 8,
        "two jobs per stored lead event, none for the duplicate"
    );

    // The metrics count the writer's groups, their calls and its time. Other tests of this
    // binary may write on the same engine meanwhile: at least these six calls are counted.
    let after = metrics().ingest_writer_totals(engine);
    let calls = after.calls - before.calls;
    assert!(calls >= 6, "{before:?} → {after:?}");
    assert!(
        (1..=calls).contains(&(after.groups - before.groups)),
        "{before:?} → {after:?}"
    );
    assert!(
        after.busy_seconds > before.busy_seconds,
        "{before:?} → {after:?}"
    );
    // Each call's time in its group is timed, and its wait in the queue (which may round to
    // nothing when the writer was idle).
    assert!(
        after.group_seconds > before.group_seconds && after.queued_seconds >= before.queued_seconds,
        "{before:?} → {after:?}"
    );
    // SQLite acknowledges after an fsync of its write-ahead log, which is timed, and so is each
    // call's time from its commit until then; Postgres flushes inside its commit and has none.
    let syncs = after.log_syncs - before.log_syncs;
    let synced_calls = after.synced_calls - before.synced_calls;
    match store.backend() {
        Backend::Sqlite => assert!(
            syncs >= 1
                && after.log_sync_seconds > before.log_sync_seconds
                && synced_calls >= 6
                && after.sync_seconds > before.sync_seconds,
            "{before:?} → {after:?}"
        ),
        Backend::Postgres => {
            assert_eq!((syncs, synced_calls), (0, 0), "{before:?} → {after:?}");
        }
    }
    Ok(())
}

/// A Hana id names the entity its record created under any application; when two applications
/// hold the same id, the entity created first.
async fn hana_ids_are_found_under_each_application(store: Store) -> TestResult {
    let ingester =
        Ingester::start(store.clone(), IngestPolicy::default()).expect("the ingest writer starts");
    for (application_id, lead_id, name) in [
        ("app-1", "shared", "One"),
        ("app-2", "shared", "Two"),
        ("app-2", "only-two", "Only"),
    ] {
        let outcome = ingester
            .ingest(call_in(
                application_id,
                HanaEventKind::LeadCreated,
                lead_id,
                name,
            ))
            .await?;
        assert!(!outcome.duplicate && !outcome.quarantined);
    }
    for (hana_id, name) in [
        ("shared", Some("One")),
        ("only-two", Some("Only")),
        ("missing", None),
    ] {
        let lead = lead_by_hana_id(&store, hana_id).await?;
        assert_eq!(
            lead.as_ref().map(|lead| lead.name.as_str()),
            name,
            "{hana_id}"
        );
    }
    Ok(())
}

/// A ticket whose `lead` section names a stored lead gets that lead as its contact; one naming a
/// lead LeadRelay has not seen gets none. (Leads have no contact: their own events never look one
/// up.)
async fn tickets_name_their_stored_contact_lead(store: Store) -> TestResult {
    let ingester =
        Ingester::start(store.clone(), IngestPolicy::default()).expect("the ingest writer starts");
    ingester
        .ingest(call(HanaEventKind::LeadCreated, "contact-lead", "Contact"))
        .await?;
    let lead = lead_by_hana_id(&store, "contact-lead")
        .await?
        .ok_or("the lead was not stored")?;
    let (known, unknown) = tokio::join!(
        ingester.ingest(ticket("ticket-known", "contact-lead")),
        ingester.ingest(ticket("ticket-unknown", "never-seen")),
    );
    assert!(!known?.quarantined && !unknown?.quarantined);
    for (ticket_id, contact) in [("ticket-known", lead.id.as_str()), ("ticket-unknown", "")] {
        let deal = deal_by_hana_id(&store, ticket_id)
            .await?
            .ok_or("the deal was not stored")?;
        assert_eq!(deal.title, "Ticket");
        assert_eq!(
            deal.contact
                .map(|contact| contact.lead_id)
                .unwrap_or_default(),
            contact,
            "{ticket_id}"
        );
    }
    Ok(())
}

/// Updates of one lead queued one after another apply in that order, however the writer cuts
/// them into groups. Each round is cut at least once: 300 calls are more than one group holds
/// (256), so they enter the writer's queue as two batches and commit in two groups.
async fn updates_apply_in_arrival_order_across_groups(store: Store) -> TestResult {
    let ingester =
        Ingester::start(store.clone(), IngestPolicy::default()).expect("the ingest writer starts");
    for round in 0..5 {
        let lead_id = format!("ordered-{round}");
        ingester
            .ingest(call(HanaEventKind::LeadCreated, &lead_id, "created"))
            .await?;
        let updates: Vec<HanaCall> = (0..300)
            .map(|version| call(HanaEventKind::LeadUpdated, &lead_id, &format!("v{version}")))
            .collect();
        for outcome in ingester.ingest_all(updates).await {
            let outcome = outcome?;
            assert!(!outcome.duplicate && !outcome.quarantined);
        }
        let lead = lead_by_hana_id(&store, &lead_id)
            .await?
            .ok_or("the lead was not stored")?;
        assert_eq!(lead.name, "v299", "{lead_id}");
    }
    Ok(())
}

/// The dedupe key a Hana event is stored under: its entity's id, then its content hash.
async fn stored_dedupe_key(store: &Store, event_id: &str) -> Result<String, sqlx::Error> {
    sqlx::query_scalar("SELECT dedupe_key FROM events WHERE id = $1")
        .bind(event_id)
        .fetch_one(store.pool())
        .await
}

/// A redelivery is recognised in a later group, whether its event was stored under its entity's
/// id and content hash (now) or under the content hash alone (before).
async fn redeliveries_are_recognised_under_either_key(store: Store) -> TestResult {
    let ingester =
        Ingester::start(store.clone(), IngestPolicy::default()).expect("the ingest writer starts");
    let created = call(HanaEventKind::LeadCreated, "lead-keys", "Created");
    let first = ingester.ingest(created.clone()).await?;
    let lead = lead_by_hana_id(&store, "lead-keys")
        .await?
        .ok_or("the lead was not stored")?;
    let key = stored_dedupe_key(&store, &first.event_id).await?;
    let (entity_id, content_hash) = key.split_once(':').ok_or("a key without its entity")?;
    assert_eq!(entity_id, lead.id);
    assert_eq!(content_hash.len(), 64, "{key}");
    let again = ingester.ingest(created.clone()).await?;
    assert!(again.duplicate, "a redelivery in a later group");
    assert_eq!(again.event_id, first.event_id);

    // An update stored before keys named their entity: under its content hash alone.
    let updated = call(HanaEventKind::LeadUpdated, "lead-keys", "Updated");
    let earlier = ingester.ingest(updated.clone()).await?;
    let key = stored_dedupe_key(&store, &earlier.event_id).await?;
    let (_, content_hash) = key.split_once(':').ok_or("a key without its entity")?;
    sqlx::query("UPDATE events SET dedupe_key = $1 WHERE id = $2")
        .bind(content_hash)
        .bind(&earlier.event_id)
        .execute(store.pool())
        .await?;
    let before = queries::stats(store.pool()).await?;
    let (redelivered, new_update) = tokio::join!(
        ingester.ingest(updated),
        ingester.ingest(call(HanaEventKind::LeadUpdated, "lead-keys", "Newer")),
    );
    let (redelivered, new_update) = (redelivered?, new_update?);
    assert!(
        redelivered.duplicate,
        "an event stored under its hash alone"
    );
    assert_eq!(redelivered.event_id, earlier.event_id);
    assert!(!new_update.duplicate);
    let after = queries::stats(store.pool()).await?;
    assert_eq!(
        (
            after.events - before.events,
            after.duplicates - before.duplicates
        ),
        (1, 1)
    );
    let duplicate_count: i64 =
        sqlx::query_scalar("SELECT duplicate_count FROM events WHERE id = $1")
            .bind(&earlier.event_id)
            .fetch_one(store.pool())
            .await?;
    assert_eq!(duplicate_count, 1);
    Ok(())
}

#[tokio::test]
async fn sqlite_groups_behave_like_single_commits() -> TestResult {
    let dir = tempfile::tempdir()?;
    let url: DatabaseUrl = format!("sqlite://{}/lr.db", dir.path().display()).parse()?;
    let store = Store::connect(&url).await?;
    store.migrate().await?;
    calls_sharing_a_group(store.clone()).await?;
    hana_ids_are_found_under_each_application(store.clone()).await?;
    redeliveries_are_recognised_under_either_key(store.clone()).await?;
    tickets_name_their_stored_contact_lead(store.clone()).await?;
    updates_apply_in_arrival_order_across_groups(store).await
}

#[tokio::test]
async fn postgres_groups_behave_like_single_commits() -> TestResult {
    let database = TestDatabase::create("ingest").await?;
    let store = Store::connect(&database.url().parse()?).await?;
    store.migrate().await?;
    calls_sharing_a_group(store.clone()).await?;
    hana_ids_are_found_under_each_application(store.clone()).await?;
    redeliveries_are_recognised_under_either_key(store.clone()).await?;
    tickets_name_their_stored_contact_lead(store.clone()).await?;
    updates_apply_in_arrival_order_across_groups(store.clone()).await?;
    store.close().await;
    database.drop_database().await
}

/// A migrated store at `url` and an ingest writer on it that has stored a call, so that it holds
/// a connection.
async fn writer_with_a_connection(
    url: &str,
) -> Result<(Store, Ingester), Box<dyn std::error::Error + Send + Sync>> {
    let store = Store::connect(&url.parse()?).await?;
    store.migrate().await?;
    let ingester = Ingester::start(store.clone(), IngestPolicy::default())?;
    let before = ingester
        .ingest(call(HanaEventKind::LeadCreated, "lead-before", "Before"))
        .await?;
    assert!(!before.duplicate && !before.quarantined);
    Ok((store, ingester))
}

/// The Postgres writer keeps its connection between groups. When Postgres ends that connection
/// (a restart, a failover, an operator's `pg_terminate_backend`), the group on it fails and goes
/// again on a new connection: the caller never sees the failure.
#[tokio::test]
async fn postgres_writer_replaces_a_connection_the_server_ended() -> TestResult {
    let database = TestDatabase::create("ingest_reconnect").await?;
    let (store, ingester) = writer_with_a_connection(database.url()).await?;

    let ended: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = current_database() AND pid <> pg_backend_pid()",
    )
    .fetch_all(store.pool())
    .await?;
    assert!(
        ended.iter().any(|ended| *ended),
        "the writer's connection was open and is now ended"
    );

    let after = ingester
        .ingest(call(HanaEventKind::LeadCreated, "lead-after", "After"))
        .await?;
    assert!(!after.duplicate && !after.quarantined);
    let stored = lead_by_hana_id(&store, "lead-after")
        .await?
        .ok_or("the call after the connection ended is stored")?;
    assert_eq!(stored.name, "After");
    store.close().await;
    database.drop_database().await
}

/// A Postgres host that vanishes (a failover to another address, a network partition) ends no
/// connection: statements on it wait for the system's TCP timeout, 15 minutes on Linux. The writer
/// gives the group up after 5 s, tries a new connection once, and answers every call of the group
/// with the failure at once instead of trying each on its own (5 s more per call). Once the
/// database can be reached again, the writer stores calls again, the refused ones included.
#[tokio::test]
async fn postgres_writer_gives_up_a_database_that_stopped_answering() -> TestResult {
    let database = TestDatabase::create("ingest_silence").await?;
    let relay = TcpRelay::start(database.server_addr().await?).await?;
    let (_store, ingester) = writer_with_a_connection(&database.url_at(relay.addr())?).await?;

    relay.cut();
    let calls = || {
        (0..20)
            .map(|n| {
                call(
                    HanaEventKind::LeadCreated,
                    &format!("lead-silenced-{n}"),
                    "Silenced",
                )
            })
            .collect::<Vec<_>>()
    };
    // Expected after ~10 s (the group's 5 s, then 5 s for a new connection); without a deadline
    // the group waits out the TCP timeout and this one fails.
    let refused = tokio::time::timeout(
        std::time::Duration::from_secs(40),
        ingester.ingest_all(calls()),
    )
    .await
    .map_err(|_| "the writer still waits for a database that stopped answering")?;
    for outcome in &refused {
        let Err(error) = outcome else {
            panic!("a call was answered as stored while the database was silent: {outcome:?}");
        };
        let message = error.to_string();
        assert!(
            message.contains("did not answer within 5 s")
                || message.contains("no connection within 5 s"),
            "the failure says the database is silent: {message}"
        );
    }

    relay.restore();
    let stored = ingester.ingest_all(calls()).await;
    for outcome in stored {
        let outcome = outcome?;
        assert!(!outcome.duplicate && !outcome.quarantined, "{outcome:?}");
    }
    // Read past the relay: the pool's connections through it went silent at the cut.
    let direct = Store::connect(&database.url().parse()?).await?;
    let lead = lead_by_hana_id(&direct, "lead-silenced-19")
        .await?
        .ok_or("a call refused while the database was silent is stored when sent again")?;
    assert_eq!(lead.name, "Silenced");
    direct.close().await;
    drop(relay);
    database.drop_database().await
}

/// The nice values of this process's threads named `name`, read from `/proc`.
#[cfg(target_os = "linux")]
fn nice_of_threads(name: &str) -> Result<Vec<i32>, Box<dyn std::error::Error + Send + Sync>> {
    let mut nice = Vec::new();
    for task in std::fs::read_dir("/proc/self/task")? {
        let task = task?.path();
        let (Ok(comm), Ok(stat)) = (
            std::fs::read_to_string(task.join("comm")),
            std::fs::read_to_string(task.join("stat")),
        ) else {
            continue; // the thread ended meanwhile
        };
        if comm.trim_end() != name {
            continue;
        }
        // Fields after the name in parentheses, from the state (field 3); nice is field 19.
        let after_name = stat.rsplit_once(") ").map_or("", |(_, rest)| rest);
        let field = after_name
            .split(' ')
            .nth(19 - 3)
            .ok_or("a short stat line")?;
        nice.push(field.parse()?);
    }
    Ok(nice)
}

/// The writer and the thread that fsyncs the log are serial: every webhook waits for each. They
/// run ahead of the runtime's threads wherever the process may raise a thread's priority (root,
/// CAP_SYS_NICE), and at the process's priority elsewhere.
#[cfg(target_os = "linux")]
#[tokio::test]
async fn the_serial_ingest_threads_run_ahead_of_the_runtime_where_allowed() -> TestResult {
    // Tried with the threads' own value, on a thread of its own, which starts at the process's
    // priority and ends with the change.
    let (allowed, process_nice) = std::thread::spawn(|| {
        let process_nice = rustix::process::getpriority_process(None);
        (
            rustix::process::setpriority_process(None, -10).is_ok(),
            process_nice,
        )
    })
    .join()
    .map_err(|_| "the probing thread panicked")?;
    let expected = if allowed { -10 } else { process_nice? };

    let dir = tempfile::tempdir()?;
    let url: DatabaseUrl = format!("sqlite://{}/lr.db", dir.path().display()).parse()?;
    let store = Store::connect(&url).await?;
    store.migrate().await?;
    let ingester = Ingester::start(store.clone(), IngestPolicy::default())?;
    ingester
        .ingest(call(HanaEventKind::LeadCreated, "lead-nice", "Nice"))
        .await?;
    // Other tests of this binary start writers too; each raises its own priority as it starts.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let (writers, syncs) = (
            nice_of_threads("sqlite-writer")?,
            nice_of_threads("sqlite-sync")?,
        );
        let settled = !writers.is_empty()
            && !syncs.is_empty()
            && writers.iter().chain(&syncs).all(|nice| *nice == expected);
        if settled {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "writers at nice {writers:?} and log syncs at {syncs:?}, expected {expected} \
             (raising a priority is {}allowed here)",
            if allowed { "" } else { "not " }
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    drop(ingester);
    store.close().await;
    Ok(())
}
