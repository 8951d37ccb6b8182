//! Any bytes a caller can post to `/webhooks/hana/{event}`: the parser must answer with a
//! webhook or a reason, never panic, and whatever it accepts must map to a Lead and a Deal.

#![no_main]

use leadrelay_gateway::hana_body::parse_hana_body;
use leadrelay_orchestrator::mapping::{hana_id, map_deal, map_lead};
use leadrelay_proto::v1::{Deal, Lead};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(webhook) = parse_hana_body(data) else {
        return;
    };
    let _ = hana_id(&webhook.lead);
    let _ = hana_id(&webhook.opportunity);
    let mut lead = Lead::default();
    map_lead(&mut lead, &webhook.lead, &webhook.conversation_url);
    assert_eq!(
        lead.raw.len(),
        webhook.lead.len(),
        "every attribute is kept"
    );
    let mut deal = Deal::default();
    map_deal(&mut deal, &webhook.opportunity, &webhook.conversation_url);
    assert_eq!(
        deal.raw.len(),
        webhook.opportunity.len(),
        "every attribute is kept"
    );
});
