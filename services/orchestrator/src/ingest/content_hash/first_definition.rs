//! The content hash as it was first defined: of the kind, the application and the canonical text
//! of a `serde_json::Value`. Stored events are keyed by it, so the hash in use must stay equal to
//! it. One file for the module's tests and the `content_hash` fuzz target, which includes it by
//! path: both check against the same definition.

use std::fmt::Write as _;

use leadrelay_proto::v1::HanaEventKind;
use sha2::{Digest, Sha256};

/// The hash as first defined, in lower-case hex.
pub(crate) fn hash_as_first_defined(
    kind: HanaEventKind,
    application_id: &str,
    raw_body: &[u8],
) -> String {
    let mut hasher = Sha256::new();
    for part in [kind.event_name(), application_id] {
        hasher.update(part.as_bytes());
        hasher.update([0]);
    }
    match serde_json::from_slice::<serde_json::Value>(raw_body) {
        Ok(json) => hasher.update(canonical_text(&json).as_bytes()),
        Err(_) => hasher.update(raw_body),
    }
    hasher.update([0]);
    hasher
        .finalize()
        .iter()
        .fold(String::with_capacity(64), |mut hex, byte| {
            // Writing into a String cannot fail.
            let _ = write!(hex, "{byte:02x}");
            hex
        })
}

/// Members in name order (serde_json's `Map` without `preserve_order`), no whitespace.
fn canonical_text(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::Object(fields) => {
            let members: Vec<String> = fields
                .iter()
                .map(|(name, field)| {
                    format!(
                        "{}:{}",
                        serde_json::Value::String(name.clone()),
                        canonical_text(field)
                    )
                })
                .collect();
            format!("{{{}}}", members.join(","))
        }
        serde_json::Value::Array(items) => {
            let items: Vec<String> = items.iter().map(canonical_text).collect();
            format!("[{}]", items.join(","))
        }
        other => other.to_string(),
    }
}
