//! What every adapter's HTTP client to an outside API shares: one way to build the client, and
//! error text a user can read that never carries the request's URL (an outside URL may hold a
//! company domain or, for some APIs, a key).

use std::time::Duration;

use tracing::Instrument as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// An HTTP client for an outside API: rustls, pooled connections, `timeout` per call and at most
/// 5 s to connect, and LeadRelay's user agent.
pub fn http_client(timeout: Duration) -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(5)))
        .pool_idle_timeout(Duration::from_secs(60))
        .user_agent(concat!("LeadRelay/", env!("CARGO_PKG_VERSION")))
        .build()
}

/// A transport error with its causes, its URL replaced by `system` ("Pipedrive", …).
pub fn transport_text(error: &reqwest::Error, system: &str) -> String {
    let mut text = error.to_string();
    if let Some(url) = error.url() {
        text = text.replace(url.as_str(), system);
    }
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The first 300 characters of a body, trimmed, for messages.
pub fn snippet(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let trimmed = text.trim();
    match trimmed.char_indices().nth(300) {
        Some((cut, _)) => format!("{}…", &trimmed[..cut]),
        None => trimmed.to_owned(),
    }
}

/// Sends `request` to `system` ("pipedrive", "salesman", "hana") in a client span that continues
/// the current trace and hands it on in the `traceparent` header, counting the call and its time
/// in the metrics by HTTP status, or `timeout` / `network` when no answer came.
///
/// The span names the method, the system and the host, never the URL's path or query, which
/// may carry ids of people or a credential.
pub async fn send(
    system: &str,
    request: reqwest::RequestBuilder,
) -> Result<reqwest::Response, reqwest::Error> {
    let (client, request) = request.build_split();
    let mut request = request?;
    let span = tracing::info_span!(
        "outbound call",
        otel.name = %format_args!("{} {system}", request.method()),
        otel.kind = "client",
        http.request.method = %request.method(),
        server.address = request.url().host_str().unwrap_or_default(),
        crm.system = system,
        http.response.status_code = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
    );
    let context = span.context();
    opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.inject_context(
            &context,
            &mut opentelemetry_http::HeaderInjector(request.headers_mut()),
        );
    });
    let started = std::time::Instant::now();
    let answer = client.execute(request).instrument(span.clone()).await;
    // A client call that got no answer, or an answer of 4xx or 5xx, failed.
    let (status, failed) = match &answer {
        Ok(response) => {
            let code = response.status().as_u16();
            span.record("http.response.status_code", code);
            (code.to_string(), code >= 400)
        }
        Err(error) if error.is_timeout() => ("timeout".to_owned(), true),
        Err(_) => ("network".to_owned(), true),
    };
    if failed {
        span.record("otel.status_code", "ERROR");
    }
    crate::metrics::metrics().crm_call(system, &status, started.elapsed());
    answer
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snippets_are_trimmed_and_cut_on_a_character_boundary() {
        assert_eq!(snippet(b"  Bad Gateway \n"), "Bad Gateway");
        let long = "й".repeat(400);
        let cut = snippet(long.as_bytes());
        assert_eq!(cut.chars().count(), 301);
        assert!(cut.ends_with('…'));
    }
}
