//! Any bytes a caller can post: the hash a redelivery is recognised by must be the one it was
//! first defined as (the canonical text of a `serde_json::Value`), because stored events are keyed
//! by it. The hash reads bodies into a tree of its own; this checks that tree against serde_json.

#![no_main]

use leadrelay_orchestrator::ingest::redelivery_hash;
use leadrelay_proto::v1::{HanaEventKind, HanaWebhook};
use libfuzzer_sys::fuzz_target;

/// The hash's first definition, shared with the orchestrator's own tests.
#[path = "../../services/orchestrator/src/ingest/content_hash/first_definition.rs"]
mod first_definition;

mod raw_value_token;
use raw_value_token::names_the_raw_value_token;

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
