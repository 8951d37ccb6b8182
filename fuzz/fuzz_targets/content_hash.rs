//! Any bytes a caller can post: the hash a redelivery is recognised by must be the one it was
//! first defined as (the canonical text of a `serde_json::Value`), because stored events are keyed
//! by it. The hash reads bodies into a tree of its own; this checks that tree against serde_json.

#![no_main]

use std::fmt::{self, Write as _};

use leadrelay_orchestrator::ingest::redelivery_hash;
use leadrelay_proto::v1::{HanaEventKind, HanaWebhook};
use libfuzzer_sys::fuzz_target;
use serde::de::{Deserializer as _, MapAccess, SeqAccess, Visitor};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// The name serde_json's `Value` reads as raw JSON text when it comes first in an object (its
/// `raw_value` feature is on): the one documented difference, skipped here.
const RAW_VALUE_TOKEN: &str = "$serde_json::private::RawValue";

fuzz_target!(|data: &[u8]| {
    if names_the_raw_value_token(data) {
        return;
    }
    let webhook = HanaWebhook {
        application_id: "app".to_owned(),
        ..Default::default()
    };
    let kind = HanaEventKind::LeadUpdated;
    assert_eq!(
        redelivery_hash(kind, &webhook, data),
        hash_as_first_defined(kind, "app", data),
        "body: {:?}",
        String::from_utf8_lossy(data)
    );
});

/// The hash as first defined: of the kind, the application and the Value's canonical text.
fn hash_as_first_defined(kind: HanaEventKind, application_id: &str, raw_body: &[u8]) -> String {
    let mut hasher = Sha256::new();
    for part in [kind.event_name(), application_id] {
        hasher.update(part.as_bytes());
        hasher.update([0]);
    }
    match serde_json::from_slice::<Value>(raw_body) {
        Ok(json) => hasher.update(canonical_text(&json).as_bytes()),
        Err(_) => hasher.update(raw_body),
    }
    hasher.update([0]);
    hasher
        .finalize()
        .iter()
        .fold(String::with_capacity(64), |mut hex, byte| {
            let _ = write!(hex, "{byte:02x}");
            hex
        })
}

/// Members in name order (serde_json's `Map` without `preserve_order`), no whitespace.
fn canonical_text(value: &Value) -> String {
    match value {
        Value::Object(fields) => {
            let members: Vec<String> = fields
                .iter()
                .map(|(name, field)| {
                    format!("{}:{}", Value::String(name.clone()), canonical_text(field))
                })
                .collect();
            format!("{{{}}}", members.join(","))
        }
        Value::Array(items) => {
            let items: Vec<String> = items.iter().map(canonical_text).collect();
            format!("[{}]", items.join(","))
        }
        other => other.to_string(),
    }
}

/// Whether any object in the body, read as JSON, names the raw-value token (escapes decoded).
fn names_the_raw_value_token(data: &[u8]) -> bool {
    let mut deserializer = serde_json::Deserializer::from_slice(data);
    deserializer.deserialize_any(TokenFinder).unwrap_or(false)
}

/// Walks a JSON document and answers whether an object names [`RAW_VALUE_TOKEN`].
struct TokenFinder;

impl<'de> Visitor<'de> for TokenFinder {
    type Value = bool;

    fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("any JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<bool, E> {
        Ok(false)
    }

    fn visit_i64<E>(self, _: i64) -> Result<bool, E> {
        Ok(false)
    }

    fn visit_u64<E>(self, _: u64) -> Result<bool, E> {
        Ok(false)
    }

    fn visit_f64<E>(self, _: f64) -> Result<bool, E> {
        Ok(false)
    }

    fn visit_str<E>(self, _: &str) -> Result<bool, E> {
        Ok(false)
    }

    fn visit_unit<E>(self) -> Result<bool, E> {
        Ok(false)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut items: A) -> Result<bool, A::Error> {
        let mut found = false;
        while let Some(item) = items.next_element_seed(Seed)? {
            found |= item;
        }
        Ok(found)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut members: A) -> Result<bool, A::Error> {
        let mut found = false;
        while let Some(name) = members.next_key::<String>()? {
            found |= name == RAW_VALUE_TOKEN;
            found |= members.next_value_seed(Seed)?;
        }
        Ok(found)
    }
}

/// [`TokenFinder`] for a nested value.
struct Seed;

impl<'de> serde::de::DeserializeSeed<'de> for Seed {
    type Value = bool;

    fn deserialize<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<bool, D::Error> {
        deserializer.deserialize_any(TokenFinder)
    }
}
