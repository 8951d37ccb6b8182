//! Any bytes a caller can post: the hash a redelivery is recognised by must be the one it was
//! first defined as (the canonical text of a `serde_json::Value`), because stored events are keyed
//! by it. The hash reads bodies into a tree of its own; this checks that tree against serde_json.

#![no_main]

use std::fmt;

use leadrelay_orchestrator::ingest::redelivery_hash;
use leadrelay_proto::v1::{HanaEventKind, HanaWebhook};
use libfuzzer_sys::fuzz_target;
use serde::de::{Deserializer as _, MapAccess, SeqAccess, Visitor};

/// The hash's first definition, shared with the orchestrator's own tests.
#[path = "../../services/orchestrator/src/ingest/content_hash/first_definition.rs"]
mod first_definition;

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
        first_definition::hash_as_first_defined(kind, "app", data),
        "body: {:?}",
        String::from_utf8_lossy(data)
    );
});

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
