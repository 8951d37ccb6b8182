//! Any bytes a caller can post to `/webhooks/hana/{event}`: the parser must answer with a
//! webhook or a reason, never panic, give the webhook or the reason the parser first defined
//! (through a `serde_json::Value`) gives, and whatever it accepts must map to a Lead and a Deal.

#![no_main]

use leadrelay_gateway::hana_body::parse_hana_body;
use leadrelay_orchestrator::mapping::{hana_id, map_deal, map_lead};
use leadrelay_proto::v1::{Deal, Lead};
use libfuzzer_sys::fuzz_target;

/// The parser's first definition, shared with the gateway's own tests.
#[path = "../../gateway/src/hana_body/first_definition.rs"]
mod first_definition;

mod raw_value_token;
use raw_value_token::names_the_raw_value_token;

fuzz_target!(|data: &[u8]| {
    let parsed = parse_hana_body(data);
    if !names_the_raw_value_token(data) {
        assert_eq!(
            parsed.as_ref().cloned().map_err(ToString::to_string),
            first_definition::parse_as_first_defined(data),
            "body: {:?}",
            String::from_utf8_lossy(data)
        );
    }
    let Ok(webhook) = parsed else {
        return;
    };
    let _ = hana_id(&webhook.lead);
    let _ = hana_id(&webhook.opportunity);
    // The mapping keeps the attributes it is given; they are counted first.
    let (lead_attributes, deal_attributes) = (webhook.lead.len(), webhook.opportunity.len());
    let mut lead = Lead::default();
    map_lead(&mut lead, webhook.lead, &webhook.conversation_url);
    assert_eq!(lead.raw.len(), lead_attributes, "every attribute is kept");
    let mut deal = Deal::default();
    map_deal(&mut deal, webhook.opportunity, &webhook.conversation_url);
    assert_eq!(deal.raw.len(), deal_attributes, "every attribute is kept");
});
