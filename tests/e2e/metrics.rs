//! `/metrics`: every service process serves Prometheus text, and the counters move with traffic.

use std::{collections::BTreeMap, time::Duration};

use leadrelay_testkit::pipedrive::crm::Crm;
use wiremock::MockServer;

use crate::{
    hana_ingest::SEED_SAMPLE,
    support::{Error, Service, TestResult, Up},
};

/// Samples by `name{labels}`, checking every line as the text exposition format has it.
fn parse(text: &str) -> Result<BTreeMap<String, f64>, Error> {
    let mut samples = BTreeMap::new();
    let mut ended = false;
    for line in text.lines() {
        if ended {
            return Err(format!("text after # EOF: {line}").into());
        }
        if line == "# EOF" {
            ended = true;
            continue;
        }
        if let Some(comment) = line.strip_prefix("# ") {
            let kind = comment.split_whitespace().next().unwrap_or_default();
            if !matches!(kind, "HELP" | "TYPE" | "UNIT") {
                return Err(format!("unknown comment: {line}").into());
            }
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .ok_or_else(|| format!("no value: {line}"))?;
        let name_end = series.find('{').unwrap_or(series.len());
        let name = &series[..name_end];
        let valid_name = name.chars().enumerate().all(|(index, c)| {
            c.is_ascii_alphabetic() || c == '_' || c == ':' || (index > 0 && c.is_ascii_digit())
        });
        if name.is_empty() || !valid_name {
            return Err(format!("bad metric name: {line}").into());
        }
        if name_end < series.len() && !series.ends_with('}') {
            return Err(format!("unclosed labels: {line}").into());
        }
        let value: f64 = value.parse().map_err(|_| format!("bad value: {line}"))?;
        samples.insert(series.to_owned(), value);
    }
    if !ended {
        return Err("no # EOF".into());
    }
    Ok(samples)
}

async fn scrape(addr: std::net::SocketAddr) -> Result<BTreeMap<String, f64>, Error> {
    let answer = reqwest::get(format!("http://{addr}/metrics")).await?;
    if answer.status() != 200 {
        return Err(format!("/metrics answered {}", answer.status()).into());
    }
    parse(&answer.text().await?)
}

fn value(samples: &BTreeMap<String, f64>, series: &str) -> f64 {
    samples.get(series).copied().unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_counters_move_with_webhooks_jobs_and_crm_calls() -> TestResult {
    let pipedrive_fake = MockServer::start().await;
    Crm::new().mount(&pipedrive_fake).await;
    let folder = tempfile::tempdir()?;
    let pipedrive_url = pipedrive_fake.uri();
    let up = Up::start(
        folder.path(),
        &[
            ("LEADRELAY_PIPEDRIVE_API_URL", pipedrive_url.as_str()),
            ("LEADRELAY_PIPEDRIVE_API_TOKEN", "pd-metrics-token-1"),
            ("LEADRELAY_PIPEDRIVE_POLL_INTERVAL", "1h"),
        ],
    )?;
    let metrics = up.addr("metrics");
    let before = scrape(metrics).await?;
    let accepted = r#"leadrelay_webhooks_total{source="hana",outcome="accepted"}"#;
    assert_eq!(value(&before, accepted), 0.0);

    let http = reqwest::Client::new();
    for _ in 0..2 {
        let answer = http
            .post(up.hana_webhook("lead.created"))
            .body(SEED_SAMPLE)
            .send()
            .await?;
        assert_eq!(answer.status(), 200);
    }
    let refused = http
        .post(format!(
            "{}/webhooks/hana/lead.created?token=wrong",
            up.gateway_url()
        ))
        .body(SEED_SAMPLE)
        .send()
        .await?;
    assert_eq!(refused.status(), 401);

    // The Pipedrive job runs; SalesMan is not configured, so its job waits.
    let done = r#"leadrelay_jobs_finished_total{target="pipedrive",outcome="done"}"#;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let after = loop {
        let samples = scrape(metrics).await?;
        // The counter moves once the store records the outcome, which a scrape may read a moment
        // before it encodes the counter.
        if value(&samples, done) == 1.0
            && !samples.contains_key(r#"leadrelay_jobs{target="pipedrive",state="running"}"#)
        {
            break samples;
        }
        if std::time::Instant::now() > deadline {
            return Err(format!("no done job in the metrics: {samples:#?}").into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(value(&after, accepted), 1.0);
    assert_eq!(
        value(
            &after,
            r#"leadrelay_webhooks_total{source="hana",outcome="duplicate"}"#
        ),
        1.0
    );
    assert_eq!(
        value(
            &after,
            r#"leadrelay_webhooks_total{source="hana",outcome="unauthorized"}"#
        ),
        1.0
    );
    assert_eq!(
        value(
            &after,
            r#"leadrelay_webhook_ack_seconds_count{source="hana"}"#
        ),
        3.0
    );
    // Both webhooks the token let in went through each stage of the orchestrator's ingest, the
    // duplicate too (it is found in its group, and answered once that group is durable).
    for stage in ["queued", "group", "sync"] {
        let series =
            format!(r#"leadrelay_ingest_call_seconds_count{{engine="sqlite",stage="{stage}"}}"#);
        assert_eq!(value(&after, &series), 2.0, "{series}");
    }
    // The new lead's event, lead, link and job went into the write-ahead log as whole pages (a
    // 4 KiB page and a 24-byte header each): at least one per table written.
    let log_bytes = value(
        &after,
        r#"leadrelay_ingest_log_bytes_total{engine="sqlite"}"#,
    );
    assert!(log_bytes >= 4.0 * 4120.0, "{log_bytes} bytes");
    assert_eq!(
        log_bytes % 4120.0,
        0.0,
        "{log_bytes} bytes are not whole frames"
    );
    // The log is at least as long as what the writer appended to it (the job runner appends
    // too), far from the length at which it starts over.
    let log_length = value(
        &after,
        r#"leadrelay_ingest_log_length_bytes{engine="sqlite"}"#,
    );
    assert!(
        log_length >= log_bytes && log_length < 64.0 * 1024.0 * 1024.0,
        "a log of {log_length} bytes after {log_bytes} appended by the writer"
    );
    assert_eq!(
        log_length % 4120.0,
        0.0,
        "{log_length} bytes are not whole frames"
    );
    assert_eq!(
        value(
            &after,
            r#"leadrelay_jobs{target="salesman",state="pending"}"#
        ),
        1.0
    );
    // SalesMan is not run here, so its waiting job is no lag: only Pipedrive's age is reported,
    // and no Pipedrive job is pending.
    assert_eq!(
        value(
            &after,
            r#"leadrelay_oldest_pending_job_age_seconds{target="pipedrive"}"#
        ),
        0.0
    );
    assert!(
        after.contains_key(r#"leadrelay_oldest_pending_job_age_seconds{target="pipedrive"}"#),
        "{after:#?}"
    );
    assert!(
        !after.contains_key(r#"leadrelay_oldest_pending_job_age_seconds{target="salesman"}"#),
        "{after:#?}"
    );
    assert!(
        !after.contains_key(r#"leadrelay_jobs{target="pipedrive",state="pending"}"#),
        "a state no job is in any more is gone: {after:#?}"
    );
    // Done jobs are counted as they finish, not read from the store at each scrape.
    assert!(
        !after.contains_key(r#"leadrelay_jobs{target="pipedrive",state="done"}"#),
        "{after:#?}"
    );
    // An email search and a person creation, at least.
    assert!(
        value(
            &after,
            r#"leadrelay_crm_calls_total{system="pipedrive",status="200"}"#
        ) >= 2.0
    );
    assert!(
        value(
            &after,
            r#"leadrelay_crm_call_seconds_count{system="pipedrive"}"#
        ) >= 2.0
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn every_service_process_serves_its_metrics() -> TestResult {
    let folder = tempfile::tempdir()?;
    let database = format!("sqlite://{}/data/metrics.db", folder.path().display());
    for service in [
        "gateway",
        "orchestrator",
        "hana-adapter",
        "pipedrive-adapter",
        "salesman-adapter",
    ] {
        // Every port is 0 (the metrics' too, by `Service::start`): the process logs what it took.
        let process = Service::start(
            folder.path(),
            &[service],
            &[
                ("LEADRELAY_DATABASE_URL", database.as_str()),
                ("LEADRELAY_HANA_WEBHOOK_TOKEN", "metrics-token"),
                ("LEADRELAY_GATEWAY_LISTEN", "127.0.0.1:0"),
                ("LEADRELAY_ORCHESTRATOR_LISTEN", "127.0.0.1:0"),
                ("LEADRELAY_HANA_LISTEN", "127.0.0.1:0"),
                ("LEADRELAY_PIPEDRIVE_LISTEN", "127.0.0.1:0"),
                ("LEADRELAY_SALESMAN_LISTEN", "127.0.0.1:0"),
            ],
        )?;
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let samples = loop {
            let scraped = match process.logged_addr("metrics listening") {
                Some(metrics) => scrape(metrics).await,
                None => Err("no \"metrics listening\" line with its address yet".into()),
            };
            match scraped {
                Ok(samples) => break samples,
                Err(error) if std::time::Instant::now() > deadline => {
                    return Err(format!("{service}: {error}; logs:\n{}", process.logs()).into());
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        };
        // A process that has counted nothing yet serves an empty exposition; what matters here
        // is that it serves one, in the text format (checked by `scrape`).
        assert!(
            samples.keys().all(|name| name.starts_with("leadrelay_")),
            "{service}: {samples:?}"
        );
        drop(process);
    }
    Ok(())
}
