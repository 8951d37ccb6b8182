//! Pipedrive webhook bodies (webhooks v2, the version LeadRelay registers) read into an
//! `IngestPipedriveEventRequest`.
//!
//! Ids may arrive as numbers or strings and `meta.timestamp` as RFC 3339 or as epoch seconds or
//! milliseconds. A body that cannot be read is still sent on, raw and without fields, so the
//! orchestrator keeps it in quarantine with the reason rather than losing it.

use leadrelay_proto::{
    json::to_proto_struct,
    v1::{IngestPipedriveEventRequest, PipedriveEventOrigin},
};
use serde_json::Value;

/// An id or key as text, whether it came as a number or a string.
fn text(value: Option<&Value>) -> String {
    match value {
        Some(Value::String(text)) => text.trim().to_owned(),
        Some(Value::Number(number)) => number.to_string(),
        _ => String::new(),
    }
}

/// v2 actions, and the past-tense names older payloads used.
fn action(name: &str) -> String {
    match name.trim().to_ascii_lowercase().as_str() {
        "added" | "create" => "create".to_owned(),
        "updated" | "change" => "change".to_owned(),
        "deleted" | "delete" => "delete".to_owned(),
        other => other.to_owned(),
    }
}

fn timestamp(value: Option<&Value>) -> Option<prost_types::Timestamp> {
    let at = match value? {
        Value::String(text) => match chrono::DateTime::parse_from_rfc3339(text.trim()) {
            Ok(at) => at.with_timezone(&chrono::Utc),
            Err(_) => epoch(text.trim().parse().ok()?)?,
        },
        Value::Number(number) => epoch(number.as_f64()?)?,
        _ => return None,
    };
    Some(prost_types::Timestamp {
        seconds: at.timestamp(),
        nanos: i32::try_from(at.timestamp_subsec_nanos()).unwrap_or(0),
    })
}

/// Epoch seconds, or milliseconds when too large to be seconds.
fn epoch(number: f64) -> Option<chrono::DateTime<chrono::Utc>> {
    let millis = if number > 100_000_000_000.0 {
        number
    } else {
        number * 1000.0
    };
    if !millis.is_finite() {
        return None;
    }
    #[allow(clippy::cast_possible_truncation)]
    chrono::DateTime::from_timestamp_millis(millis as i64)
}

fn object(value: Option<&Value>) -> Option<prost_types::Struct> {
    match value {
        Some(Value::Object(fields)) => Some(to_proto_struct(fields.clone())),
        _ => None,
    }
}

/// The ingest request for a webhook body; fields it cannot find stay empty.
pub(crate) fn parse_pipedrive_body(raw_body: &[u8]) -> IngestPipedriveEventRequest {
    let mut request = IngestPipedriveEventRequest {
        origin: PipedriveEventOrigin::Webhook.into(),
        raw_body: raw_body.to_vec(),
        ..Default::default()
    };
    let Ok(Value::Object(body)) = serde_json::from_slice::<Value>(raw_body) else {
        return request;
    };
    let Some(Value::Object(meta)) = body.get("meta") else {
        return request;
    };
    request.event_key = text(meta.get("id"));
    request.entity = text(meta.get("entity")).to_ascii_lowercase();
    request.action = action(&text(meta.get("action")));
    request.entity_id = match text(meta.get("entity_id")) {
        id if id.is_empty() => text(body.get("data").and_then(|data| data.get("id"))),
        id => id,
    };
    request.occurred_at = timestamp(meta.get("timestamp"));
    request.data = object(body.get("data"));
    request.previous = object(body.get("previous"));
    request
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_v2_body_gives_its_key_entity_action_and_state() {
        let request = parse_pipedrive_body(
            br#"{"data":{"id":123,"status":"won","stage_id":4},"previous":{"status":"open"},
                "meta":{"action":"change","entity":"deal","entity_id":"123","id":"5c1c-uuid",
                        "timestamp":"2026-11-20T10:00:00.000Z","version":"2.0"}}"#,
        );
        assert_eq!(
            (
                request.event_key.as_str(),
                request.entity.as_str(),
                request.action.as_str(),
                request.entity_id.as_str()
            ),
            ("5c1c-uuid", "deal", "change", "123")
        );
        assert_eq!(
            request.occurred_at.map(|at| at.seconds),
            Some(1_795_168_800)
        );
        assert!(request.data.is_some() && request.previous.is_some());
    }

    #[test]
    fn numbers_for_ids_and_epoch_times_are_understood() {
        let request = parse_pipedrive_body(
            br#"{"data":{"id":9},"previous":null,
                "meta":{"action":"added","entity":"Deal","entity_id":9,"id":77,"timestamp":1795168800}}"#,
        );
        assert_eq!(
            (
                request.event_key.as_str(),
                request.entity.as_str(),
                request.action.as_str(),
                request.entity_id.as_str()
            ),
            ("77", "deal", "create", "9")
        );
        assert_eq!(
            request.occurred_at.map(|at| at.seconds),
            Some(1_795_168_800)
        );
        assert!(request.previous.is_none());
    }

    #[test]
    fn an_unreadable_body_is_passed_on_raw() {
        let request = parse_pipedrive_body(b"{not json");
        assert!(request.event_key.is_empty());
        assert_eq!(request.raw_body, b"{not json");
    }
}
