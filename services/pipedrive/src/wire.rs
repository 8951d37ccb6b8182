//! Pipedrive's records as API v2 sends them (v1 for webhooks), and their protobuf forms.
//!
//! Every field is optional on the way in: v2 leaves out what a record lacks and sends `null` for
//! what is empty, and a missing field must not make a whole answer unreadable.

use leadrelay_proto::{
    json::to_proto_struct,
    pipedrive::v1::{Activity, Deal, DealStatus, Person, Stage, Webhook},
};
use prost_types::Timestamp;
use serde::Deserialize;
use serde_json::{Map, Number, Value};

/// An RFC 3339 time (v2) or `YYYY-MM-DD HH:MM:SS` in UTC (v1), as a protobuf timestamp.
pub fn timestamp(text: Option<&str>) -> Option<Timestamp> {
    let text = text?.trim();
    let parsed = chrono::DateTime::parse_from_rfc3339(text)
        .map(|time| time.with_timezone(&chrono::Utc))
        .or_else(|_| {
            chrono::NaiveDateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S")
                .map(|time| time.and_utc())
        })
        .ok()?;
    Some(Timestamp {
        seconds: parsed.timestamp(),
        nanos: i32::try_from(parsed.timestamp_subsec_nanos()).unwrap_or(0),
    })
}

/// A protobuf timestamp as RFC 3339 in UTC, as v2 query parameters take it.
pub fn rfc3339(at: &Timestamp) -> Option<String> {
    let nanos = u32::try_from(at.nanos).ok()?;
    chrono::DateTime::from_timestamp(at.seconds, nanos)
        .map(|time| time.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
}

/// A deal status as v2 spells it.
pub fn status_name(status: DealStatus) -> Option<&'static str> {
    match status {
        DealStatus::Open => Some("open"),
        DealStatus::Won => Some("won"),
        DealStatus::Lost => Some("lost"),
        DealStatus::Unspecified | DealStatus::Deleted => None,
    }
}

fn status_of(name: Option<&str>, is_deleted: bool) -> DealStatus {
    if is_deleted {
        return DealStatus::Deleted;
    }
    match name {
        Some("open") => DealStatus::Open,
        Some("won") => DealStatus::Won,
        Some("lost") => DealStatus::Lost,
        // v1 webhooks may still say "deleted".
        Some("deleted") => DealStatus::Deleted,
        _ => DealStatus::Unspecified,
    }
}

/// An id that v2 sends as a number, v1 payloads sometimes as a string or an object with
/// `value`, and an empty relation as `null`.
#[derive(Debug, Default, Clone, Copy)]
pub struct Id(pub i64);

impl<'de> Deserialize<'de> for Id {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Ok(Self(id_of(&Value::deserialize(deserializer)?)))
    }
}

fn id_of(value: &Value) -> i64 {
    match value {
        Value::Number(number) => number.as_i64().unwrap_or(0),
        Value::String(text) => text.trim().parse().unwrap_or(0),
        Value::Object(fields) => fields.get("value").or(fields.get("id")).map_or(0, id_of),
        _ => 0,
    }
}

/// A v1 custom field definition (`/v1/dealFields`).
#[derive(Debug, Deserialize)]
pub struct WireField {
    pub key: String,
    #[serde(default)]
    pub name: String,
}

/// A v2 deal.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct WireDeal {
    pub id: Id,
    pub title: Option<String>,
    pub owner_id: Id,
    pub person_id: Id,
    pub org_id: Id,
    pub pipeline_id: Id,
    pub stage_id: Id,
    pub value: Option<Number>,
    pub currency: Option<String>,
    pub status: Option<String>,
    pub lost_reason: Option<String>,
    pub expected_close_date: Option<String>,
    pub probability: Option<Number>,
    pub visible_to: Option<Number>,
    pub label_ids: Option<Vec<i64>>,
    pub custom_fields: Option<Map<String, Value>>,
    pub add_time: Option<String>,
    pub update_time: Option<String>,
    pub close_time: Option<String>,
    pub won_time: Option<String>,
    pub lost_time: Option<String>,
    pub is_deleted: Option<bool>,
    pub is_archived: Option<bool>,
}

fn small(number: Option<&Number>) -> i32 {
    number.and_then(Number::as_f64).map_or(0, |number| {
        number.round().clamp(0.0, f64::from(i32::MAX)) as i32
    })
}

impl From<WireDeal> for Deal {
    fn from(deal: WireDeal) -> Self {
        let is_deleted = deal.is_deleted.unwrap_or(false);
        Self {
            id: deal.id.0,
            title: deal.title.unwrap_or_default(),
            owner_id: deal.owner_id.0,
            person_id: deal.person_id.0,
            org_id: deal.org_id.0,
            pipeline_id: deal.pipeline_id.0,
            stage_id: deal.stage_id.0,
            value: deal
                .value
                .map(|value| value.to_string())
                .unwrap_or_default(),
            currency: deal.currency.unwrap_or_default(),
            status: status_of(deal.status.as_deref(), is_deleted).into(),
            lost_reason: deal.lost_reason.unwrap_or_default(),
            expected_close_date: deal.expected_close_date.unwrap_or_default(),
            probability: small(deal.probability.as_ref()),
            visible_to: small(deal.visible_to.as_ref()),
            label_ids: deal.label_ids.unwrap_or_default(),
            custom_fields: deal.custom_fields.map(to_proto_struct),
            add_time: timestamp(deal.add_time.as_deref()),
            update_time: timestamp(deal.update_time.as_deref()),
            close_time: timestamp(deal.close_time.as_deref()),
            won_time: timestamp(deal.won_time.as_deref()),
            lost_time: timestamp(deal.lost_time.as_deref()),
            is_deleted,
            is_archived: deal.is_archived.unwrap_or(false),
        }
    }
}

/// A v2 stage.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct WireStage {
    pub id: Id,
    pub name: Option<String>,
    pub pipeline_id: Id,
    pub order_nr: Option<Number>,
    pub deal_probability: Option<Number>,
    pub is_deleted: Option<bool>,
    pub is_deal_rot_enabled: Option<bool>,
    pub days_to_rotten: Option<Number>,
    pub add_time: Option<String>,
    pub update_time: Option<String>,
}

impl From<WireStage> for Stage {
    fn from(stage: WireStage) -> Self {
        Self {
            id: stage.id.0,
            name: stage.name.unwrap_or_default(),
            pipeline_id: stage.pipeline_id.0,
            order_nr: small(stage.order_nr.as_ref()),
            deal_probability: small(stage.deal_probability.as_ref()),
            is_deleted: stage.is_deleted.unwrap_or(false),
            is_deal_rot_enabled: stage.is_deal_rot_enabled.unwrap_or(false),
            days_to_rotten: small(stage.days_to_rotten.as_ref()),
            add_time: timestamp(stage.add_time.as_deref()),
            update_time: timestamp(stage.update_time.as_deref()),
        }
    }
}

/// A v2 activity.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct WireActivity {
    pub id: Id,
    pub subject: Option<String>,
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub owner_id: Id,
    pub deal_id: Id,
    pub person_id: Id,
    pub org_id: Id,
    pub due_date: Option<String>,
    pub due_time: Option<String>,
    pub duration: Option<String>,
    pub done: Option<bool>,
    pub note: Option<String>,
    pub add_time: Option<String>,
    pub update_time: Option<String>,
    pub is_deleted: Option<bool>,
}

impl From<WireActivity> for Activity {
    fn from(activity: WireActivity) -> Self {
        Self {
            id: activity.id.0,
            subject: activity.subject.unwrap_or_default(),
            r#type: activity.kind.unwrap_or_default(),
            owner_id: activity.owner_id.0,
            deal_id: activity.deal_id.0,
            person_id: activity.person_id.0,
            org_id: activity.org_id.0,
            due_date: activity.due_date.unwrap_or_default(),
            due_time: activity.due_time.unwrap_or_default(),
            duration: activity.duration.unwrap_or_default(),
            done: activity.done.unwrap_or(false),
            note: activity.note.unwrap_or_default(),
            add_time: timestamp(activity.add_time.as_deref()),
            update_time: timestamp(activity.update_time.as_deref()),
            is_deleted: activity.is_deleted.unwrap_or(false),
        }
    }
}

/// An email or phone: `{value, primary, label}` on a person, a plain string in search results.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Contact {
    Labelled {
        value: Option<String>,
        #[serde(default)]
        primary: Option<bool>,
    },
    Plain(String),
}

fn contacts(list: Option<Vec<Contact>>) -> Vec<String> {
    let mut values: Vec<(bool, String)> = list
        .unwrap_or_default()
        .into_iter()
        .filter_map(|contact| match contact {
            Contact::Labelled { value, primary } => {
                value.map(|value| (primary.unwrap_or(false), value))
            }
            Contact::Plain(value) => Some((false, value)),
        })
        .filter(|(_, value)| !value.is_empty())
        .collect();
    // The primary one first; the rest keep their order.
    values.sort_by_key(|(primary, _)| !primary);
    values.into_iter().map(|(_, value)| value).collect()
}

/// A v2 person, or a person item of a v2 search.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct WirePerson {
    pub id: Id,
    pub name: Option<String>,
    pub owner_id: Id,
    /// Search items name the owner as an object.
    pub owner: Option<Value>,
    pub org_id: Id,
    /// Search items name the organisation as an object.
    pub organization: Option<Value>,
    pub emails: Option<Vec<Contact>>,
    pub phones: Option<Vec<Contact>>,
    pub visible_to: Option<Number>,
    pub custom_fields: Option<Value>,
    pub add_time: Option<String>,
    pub update_time: Option<String>,
}

impl From<WirePerson> for Person {
    fn from(person: WirePerson) -> Self {
        let owner_id = match person.owner_id.0 {
            0 => person.owner.as_ref().map_or(0, id_of),
            id => id,
        };
        let org_id = match person.org_id.0 {
            0 => person.organization.as_ref().map_or(0, id_of),
            id => id,
        };
        Self {
            id: person.id.0,
            name: person.name.unwrap_or_default(),
            owner_id,
            org_id,
            emails: contacts(person.emails),
            phones: contacts(person.phones),
            visible_to: small(person.visible_to.as_ref()),
            // Search items carry custom field values as a list without keys: nothing to map.
            custom_fields: match person.custom_fields {
                Some(Value::Object(fields)) => Some(to_proto_struct(fields)),
                _ => None,
            },
            add_time: timestamp(person.add_time.as_deref()),
            update_time: timestamp(person.update_time.as_deref()),
        }
    }
}

/// `data` of `GET /api/v2/persons/search`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct PersonSearch {
    pub items: Vec<PersonSearchItem>,
}

/// One search result.
#[derive(Debug, Deserialize)]
pub struct PersonSearchItem {
    pub item: WirePerson,
}

/// A v1 webhook.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct WireWebhook {
    pub id: Id,
    pub subscription_url: Option<String>,
    pub event_action: Option<String>,
    pub event_object: Option<String>,
    pub version: Option<String>,
    /// `0`/`1` in v1, sometimes a boolean.
    pub is_active: Option<Value>,
    pub http_auth_user: Option<String>,
    pub add_time: Option<String>,
    pub name: Option<String>,
}

impl From<WireWebhook> for Webhook {
    fn from(webhook: WireWebhook) -> Self {
        Self {
            id: webhook.id.0,
            subscription_url: webhook.subscription_url.unwrap_or_default(),
            event_action: webhook.event_action.unwrap_or_default(),
            event_object: webhook.event_object.unwrap_or_default(),
            version: webhook.version.unwrap_or_default(),
            is_active: match webhook.is_active {
                Some(Value::Bool(flag)) => flag,
                Some(Value::Number(number)) => number.as_i64() == Some(1),
                _ => false,
            },
            http_auth_user: webhook.http_auth_user.unwrap_or_default(),
            add_time: timestamp(webhook.add_time.as_deref()),
            name: webhook.name.unwrap_or_default(),
        }
    }
}

/// `GET /v1/activityTypes` items: the keys an activity's `type` may take.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct WireActivityType {
    pub key_string: Option<String>,
    /// `true`/`false` (older answers: `1`/`0`).
    pub active_flag: Option<Value>,
}

impl WireActivityType {
    /// Whether the type may be used.
    pub fn is_active(&self) -> bool {
        !matches!(self.active_flag, Some(Value::Bool(false)))
            && !matches!(&self.active_flag, Some(Value::Number(number)) if number.as_i64() == Some(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_v2_deal_keeps_its_exact_value_and_its_times() {
        let wire: WireDeal = serde_json::from_value(json!({
            "id": 7, "title": "T", "value": 120.5, "status": "won", "person_id": null,
            "add_time": "2026-11-20T10:00:00Z", "won_time": "2026-11-21T09:30:00+02:00",
            "custom_fields": {"abc": 1}, "label_ids": [3]
        }))
        .expect("a v2 deal");
        let deal = Deal::from(wire);
        assert_eq!(deal.value, "120.5");
        assert_eq!(deal.status(), DealStatus::Won);
        assert_eq!(deal.person_id, 0);
        assert_eq!(deal.won_time.expect("won").seconds, 1_795_246_200);
        assert!(deal.custom_fields.is_some());
    }

    #[test]
    fn ids_arrive_as_numbers_strings_or_objects() {
        assert_eq!(id_of(&json!(5)), 5);
        assert_eq!(id_of(&json!("12")), 12);
        assert_eq!(id_of(&json!({"value": 9, "name": "x"})), 9);
        assert_eq!(id_of(&json!(null)), 0);
    }

    #[test]
    fn person_contacts_list_the_primary_first_in_either_shape() {
        let wire: WirePerson = serde_json::from_value(json!({
            "id": 1, "name": "A",
            "emails": [{"value": "b@x", "primary": false}, {"value": "a@x", "primary": true}],
            "phones": ["0978712200"], "owner": {"id": 4}
        }))
        .expect("a person");
        let person = Person::from(wire);
        assert_eq!(person.emails, vec!["a@x", "b@x"]);
        assert_eq!(person.phones, vec!["0978712200"]);
        assert_eq!(person.owner_id, 4);
    }

    #[test]
    fn v1_times_and_flags_are_understood() {
        let wire: WireWebhook = serde_json::from_value(json!({
            "id": 3, "is_active": 1, "add_time": "2026-11-20 10:00:00", "version": "2.0"
        }))
        .expect("a webhook");
        let webhook = Webhook::from(wire);
        assert!(webhook.is_active);
        assert_eq!(webhook.add_time.expect("time").seconds, 1_795_168_800);
        assert_eq!(
            rfc3339(&Timestamp {
                seconds: 1_795_168_800,
                nanos: 0
            })
            .as_deref(),
            Some("2026-11-20T10:00:00Z")
        );
    }
}
