//! The names of Hana's six webhook events, as LeadRelay's URLs and stored events spell them.

use crate::v1::HanaEventKind;

impl HanaEventKind {
    /// The event's name, e.g. `lead.created`; `unknown` for the unspecified kind.
    pub fn event_name(self) -> &'static str {
        match self {
            Self::Unspecified => "unknown",
            Self::LeadCreated => "lead.created",
            Self::LeadUpdated => "lead.updated",
            Self::LeadDeleted => "lead.deleted",
            Self::OpportunityCreated => "opportunity.created",
            Self::OpportunityUpdated => "opportunity.updated",
            Self::OpportunityDeleted => "opportunity.deleted",
        }
    }

    /// The kind an event name names, exactly as spelled; `ticket.*` are aliases of
    /// `opportunity.*`, as Hana calls opportunities tickets.
    pub fn from_event_name(name: &str) -> Option<Self> {
        let name = name
            .strip_prefix("ticket.")
            .map_or_else(|| name.to_owned(), |action| format!("opportunity.{action}"));
        [
            Self::LeadCreated,
            Self::LeadUpdated,
            Self::LeadDeleted,
            Self::OpportunityCreated,
            Self::OpportunityUpdated,
            Self::OpportunityDeleted,
        ]
        .into_iter()
        .find(|kind| kind.event_name() == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticket_events_are_aliases_of_opportunity_events() {
        assert_eq!(
            HanaEventKind::from_event_name("ticket.created"),
            Some(HanaEventKind::OpportunityCreated)
        );
        assert_eq!(
            HanaEventKind::from_event_name("ticket.updated"),
            Some(HanaEventKind::OpportunityUpdated)
        );
        assert_eq!(
            HanaEventKind::from_event_name("ticket.deleted"),
            HanaEventKind::from_event_name("opportunity.deleted")
        );
        assert_eq!(
            HanaEventKind::from_event_name("lead.updated"),
            Some(HanaEventKind::LeadUpdated)
        );
        assert_eq!(HanaEventKind::from_event_name("lead.merged"), None);
        assert_eq!(HanaEventKind::from_event_name("unknown"), None);
        assert_eq!(
            HanaEventKind::from_event_name("Lead.Created"),
            None,
            "names are exact"
        );
    }
}
