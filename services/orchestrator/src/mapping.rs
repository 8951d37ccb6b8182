//! Hana attributes → the canonical Lead and Deal.
//!
//! An entity is always derived from the full set of attributes received so far (an update merges
//! its attributes into the stored ones and the entity is mapped again), so a field is never half
//! updated and `raw` always holds what Hana last said about every attribute.

use std::collections::BTreeMap;

use chrono::{DateTime, Datelike, FixedOffset, NaiveDate};
use leadrelay_proto::{
    json::from_proto_value,
    v1::{
        ContactRef, Date, Deal, DealStatus, FieldValue, Gender, Lead, Money, RawAttribute,
        StringList, field_value::Kind,
    },
};
use serde_json::Value;

/// Hana's attribute map, by attribute name.
pub type Attributes = BTreeMap<String, RawAttribute>;

/// The id of a lead or opportunity (`id` attribute), as an opaque string; empty when missing.
pub fn hana_id(attributes: &Attributes) -> String {
    match attributes.get("id").map(preferred) {
        Some(Value::String(id)) => trimmed(id),
        Some(Value::Number(number)) => number.to_string(),
        _ => String::new(),
    }
}

/// Merges `update` into `stored`: attributes in the update replace stored ones, others stay.
pub fn merge(stored: &mut Attributes, update: &Attributes) {
    for (name, attribute) in update {
        stored.insert(name.clone(), attribute.clone());
    }
}

/// Maps a lead's attributes onto `lead`, replacing every mapped field, and keeps them as its
/// `raw` (taken, not copied: the ingest writer maps every event it stores).
pub fn map_lead(lead: &mut Lead, attributes: Attributes, conversation_url: &str) {
    lead.name = text(&attributes, "baseName");
    lead.emails = texts(&attributes, "baseEmail");
    lead.phones = texts(&attributes, "basePhonenumber");
    lead.birthday = attributes.get("baseBirthday").and_then(date_of);
    lead.gender = match text(&attributes, "baseGender").to_lowercase().as_str() {
        "" => Gender::Unspecified,
        "female" | "nữ" | "nu" | "f" => Gender::Female,
        "male" | "nam" | "m" => Gender::Male,
        _ => Gender::Other,
    }
    .into();
    lead.funnel_status = text(&attributes, "baseFunnelStatus");
    lead.source_channels = texts(&attributes, "baseSourceInput");
    lead.source_type = text(&attributes, "sourceType");
    if !conversation_url.is_empty() {
        lead.conversation_url = conversation_url.to_owned();
    }
    lead.custom_fields = custom_fields(&attributes);
    lead.raw = attributes;
}

/// Maps an opportunity's attributes onto `deal`, replacing every mapped field, and keeps them as
/// its `raw` (taken, not copied). The status is left to the caller (it follows events, not
/// attributes).
pub fn map_deal(deal: &mut Deal, attributes: Attributes, conversation_url: &str) {
    deal.title = text(&attributes, "baseName");
    deal.value = attributes.get("dealValue").and_then(|attribute| {
        let amount = decimal(preferred(attribute))?;
        Some(Money {
            amount,
            currency_code: text(&attributes, "dealCurrency").to_uppercase(),
        })
    });
    deal.contact = Some(ContactRef {
        lead_id: deal
            .contact
            .as_ref()
            .map(|contact| contact.lead_id.clone())
            .unwrap_or_default(),
        email: text(&attributes, "leadEmail"),
        phone: text(&attributes, "leadPhonenumber"),
        name: text(&attributes, "leadName"),
    });
    deal.expected_close_date = attributes.get("expectedCloseDate").and_then(date_of);
    if deal.status == DealStatus::Unspecified as i32 {
        deal.status = DealStatus::Open.into();
    }
    if !conversation_url.is_empty() {
        deal.conversation_url = conversation_url.to_owned();
    }
    deal.custom_fields = custom_fields(&attributes);
    deal.raw = attributes;
}

/// The value to read: the normalised one, unless it is missing or null.
fn preferred(attribute: &RawAttribute) -> Value {
    let normalized = attribute.normalized.as_ref().map(from_proto_value);
    match normalized {
        Some(value) if !value.is_null() => value,
        _ => attribute
            .raw
            .as_ref()
            .map(from_proto_value)
            .unwrap_or(Value::Null),
    }
}

/// `text` without the whitespace around it; in its own buffer when it has none, as a Hana value
/// nearly always has (the writer maps every event it stores).
fn trimmed(text: String) -> String {
    let inner = text.trim();
    if inner.len() == text.len() {
        text
    } else {
        inner.to_owned()
    }
}

fn text(attributes: &Attributes, name: &str) -> String {
    match attributes.get(name).map(preferred) {
        Some(Value::String(text)) => trimmed(text),
        Some(Value::Number(number)) => number.to_string(),
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(Value::as_str)
            .map(str::trim)
            .find(|item| !item.is_empty())
            .unwrap_or_default()
            .to_owned(),
        _ => String::new(),
    }
}

/// A list attribute; a single string becomes a one-element list, empty entries are dropped.
fn texts(attributes: &Attributes, name: &str) -> Vec<String> {
    let values = match attributes.get(name).map(preferred) {
        Some(Value::Array(items)) => items,
        Some(single) => vec![single],
        None => Vec::new(),
    };
    values
        .into_iter()
        .filter_map(|value| match value {
            Value::String(text) => Some(trimmed(text)),
            Value::Number(number) => Some(number.to_string()),
            _ => None,
        })
        .filter(|text| !text.is_empty())
        .collect()
}

/// A number as an exact decimal string: JSON numbers keep their spelling, numeric strings are
/// accepted without grouping spaces.
fn decimal(value: Value) -> Option<String> {
    match value {
        Value::Number(number) => Some(number.to_string()),
        Value::String(text) => {
            let cleaned: String = text.chars().filter(|c| !c.is_whitespace()).collect();
            cleaned
                .parse::<f64>()
                .ok()
                .filter(|n| n.is_finite())
                .map(|_| cleaned)
        }
        _ => None,
    }
}

/// A date attribute. The normalised value is preferred because it is in the lead's local calendar
/// (`14-09-2020`), where the raw instant may be the previous day in UTC
/// (`2020-09-13T17:00:00.000Z` is midnight in Vietnam).
fn date_of(attribute: &RawAttribute) -> Option<Date> {
    let from = |value: Option<Value>| match value {
        Some(Value::String(text)) => parse_calendar_date(&text)
            .or_else(|| parse_hana_datetime(&text).map(|instant| instant.date_naive())),
        _ => None,
    };
    from(attribute.normalized.as_ref().map(from_proto_value))
        .or_else(|| from(attribute.raw.as_ref().map(from_proto_value)))
        .map(|date| Date {
            year: date.year(),
            month: i32::try_from(date.month()).unwrap_or_default(),
            day: i32::try_from(date.day()).unwrap_or_default(),
        })
}

fn parse_calendar_date(text: &str) -> Option<NaiveDate> {
    let text = text.trim();
    ["%d-%m-%Y", "%Y-%m-%d", "%d/%m/%Y"]
        .iter()
        .find_map(|format| NaiveDate::parse_from_str(text, format).ok())
}

/// Parses Hana's `yyyy-MM-dd'T'HH:mm:ss.SSSZ`: Java's `Z` is an offset like `+0700`; `+07:00`
/// and a literal `Z` are accepted too, with or without milliseconds.
pub fn parse_hana_datetime(text: &str) -> Option<DateTime<FixedOffset>> {
    let text = text.trim();
    DateTime::parse_from_rfc3339(text)
        .ok()
        .or_else(|| DateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S%.f%z").ok())
        .or_else(|| DateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S%z").ok())
}

/// Custom attributes (`cf_<type>_<name>`), typed by the type in their name, or by their JSON
/// shape when the type is one LeadRelay does not know.
fn custom_fields(attributes: &Attributes) -> BTreeMap<String, FieldValue> {
    attributes
        .iter()
        .filter(|(name, _)| name.starts_with("cf_"))
        .filter_map(|(name, attribute)| {
            let declared = name
                .trim_start_matches("cf_")
                .split('_')
                .next()
                .unwrap_or_default();
            let value = preferred(attribute);
            let kind = typed(declared, &value).or_else(|| by_shape(&value))?;
            Some((name.clone(), FieldValue { kind: Some(kind) }))
        })
        .collect()
}

fn typed(declared: &str, value: &Value) -> Option<Kind> {
    match declared {
        "number" => match value {
            Value::Number(number) => number.as_f64().map(Kind::NumberValue),
            Value::String(text) => text.trim().parse().ok().map(Kind::NumberValue),
            _ => None,
        },
        "string" | "text" | "phone" | "email" | "url" => match value {
            Value::String(text) => Some(Kind::StringValue(text.clone())),
            Value::Number(number) => Some(Kind::StringValue(number.to_string())),
            _ => None,
        },
        "date" | "datetime" => match value {
            Value::String(text) => parse_hana_datetime(text)
                .map(|instant| {
                    Kind::TimestampValue(prost_types::Timestamp {
                        seconds: instant.timestamp(),
                        nanos: i32::try_from(instant.timestamp_subsec_nanos()).unwrap_or_default(),
                    })
                })
                .or_else(|| Some(Kind::StringValue(text.clone()))),
            _ => None,
        },
        "enum" | "array" | "list" | "multiselect" => match value {
            Value::Array(_) | Value::String(_) => Some(string_list(value)),
            _ => None,
        },
        "bool" | "boolean" => value.as_bool().map(Kind::BoolValue),
        _ => None,
    }
}

fn by_shape(value: &Value) -> Option<Kind> {
    match value {
        Value::String(text) => Some(Kind::StringValue(text.clone())),
        Value::Number(number) => number.as_f64().map(Kind::NumberValue),
        Value::Bool(flag) => Some(Kind::BoolValue(*flag)),
        Value::Array(_) => Some(string_list(value)),
        Value::Null | Value::Object(_) => None,
    }
}

fn string_list(value: &Value) -> Kind {
    let values = match value {
        Value::Array(items) => items
            .iter()
            .map(|item| match item {
                Value::String(text) => text.clone(),
                other => other.to_string(),
            })
            .collect(),
        Value::String(text) => vec![text.clone()],
        _ => Vec::new(),
    };
    Kind::StringListValue(StringList { values })
}

#[cfg(test)]
mod tests {
    use leadrelay_proto::json::to_proto_value;

    use super::*;

    fn attributes(pairs: &[(&str, Value, Value)]) -> Attributes {
        pairs
            .iter()
            .map(|(name, normalized, raw)| {
                (
                    (*name).to_owned(),
                    RawAttribute {
                        normalized: Some(to_proto_value(normalized.clone())),
                        raw: Some(to_proto_value(raw.clone())),
                    },
                )
            })
            .collect()
    }

    #[test]
    fn the_seed_lead_maps_to_the_canonical_lead() {
        let attributes = attributes(&[
            (
                "id",
                "e734c76a-52ca-44f0-a21e8e1fe627c308".into(),
                "e734c76a-52ca-44f0-a21e8e1fe627c308".into(),
            ),
            ("baseName", "Toan Truyen".into(), "Toan Truyen".into()),
            (
                "baseBirthday",
                "14-09-2020".into(),
                "2020-09-13T17:00:00.000Z".into(),
            ),
            (
                "baseSourceInput",
                serde_json::json!(["Youtube", "Sendo"]),
                serde_json::json!(["Youtube", "Sendo"]),
            ),
            (
                "baseEmail",
                "toan@example.com".into(),
                "toan@example.com".into(),
            ),
            ("basePhonenumber", "0978712200".into(), "0978712200".into()),
            (
                "cf_number_kieu_so",
                serde_json::json!(1.09),
                serde_json::json!(1.09),
            ),
        ]);
        let mut lead = Lead::default();
        assert_eq!(hana_id(&attributes), "e734c76a-52ca-44f0-a21e8e1fe627c308");
        map_lead(&mut lead, attributes, "https://bot.hana.ai/apps/x/chats/y");
        assert_eq!(lead.name, "Toan Truyen");
        assert_eq!(lead.emails, ["toan@example.com"]);
        assert_eq!(lead.phones, ["0978712200"]);
        assert_eq!(
            lead.birthday,
            Some(Date {
                year: 2020,
                month: 9,
                day: 14
            })
        );
        assert_eq!(lead.source_channels, ["Youtube", "Sendo"]);
        assert_eq!(lead.conversation_url, "https://bot.hana.ai/apps/x/chats/y");
        assert_eq!(
            lead.custom_fields
                .get("cf_number_kieu_so")
                .and_then(|field| field.kind.clone()),
            Some(Kind::NumberValue(1.09))
        );
        assert_eq!(lead.raw.len(), 7);
    }

    #[test]
    fn hana_dates_parse_with_java_offsets_and_without_millis() {
        for text in [
            "2020-09-14T00:00:00.000+0700",
            "2020-09-14T00:00:00+0700",
            "2020-09-14T00:00:00.000+07:00",
            "2020-09-13T17:00:00.000Z",
            "2020-09-13T17:00:00Z",
        ] {
            let instant = parse_hana_datetime(text).map(|instant| instant.timestamp());
            assert_eq!(instant, Some(1_600_016_400), "{text}");
        }
        assert_eq!(parse_hana_datetime("14-09-2020"), None);
    }

    #[test]
    fn an_opportunity_maps_to_a_deal_with_an_exact_value() {
        let attributes = attributes(&[
            ("id", "7ad14152".into(), "7ad14152".into()),
            (
                "baseName",
                "Cập nhật ticket".into(),
                "Cập nhật ticket".into(),
            ),
            (
                "leadEmail",
                "my@example.com".into(),
                "my@example.com".into(),
            ),
            ("leadName", "Lê Hà My".into(), "Lê Hà My".into()),
            (
                "leadPhonenumber",
                "84969957194".into(),
                "84969957194".into(),
            ),
            (
                "dealValue",
                serde_json::json!(1_000_000),
                serde_json::json!(1_000_000),
            ),
            (
                "cf_enum_chau_luc",
                serde_json::json!(["Châu Âu", "Châu Á"]),
                serde_json::json!(["Châu Âu", "Châu Á"]),
            ),
        ]);
        let mut deal = Deal::default();
        map_deal(&mut deal, attributes, "");
        assert_eq!(deal.title, "Cập nhật ticket");
        assert_eq!(
            deal.value.as_ref().map(|money| money.amount.as_str()),
            Some("1000000")
        );
        assert_eq!(deal.status, DealStatus::Open as i32);
        let contact = deal.contact.unwrap_or_default();
        assert_eq!(
            (contact.email.as_str(), contact.name.as_str()),
            ("my@example.com", "Lê Hà My")
        );
        assert_eq!(
            deal.custom_fields
                .get("cf_enum_chau_luc")
                .and_then(|field| field.kind.clone()),
            Some(Kind::StringListValue(StringList {
                values: vec!["Châu Âu".into(), "Châu Á".into()]
            }))
        );
    }

    #[test]
    fn updates_merge_and_later_values_win() {
        let mut stored = attributes(&[
            ("id", "1".into(), "1".into()),
            ("baseName", "Old".into(), "Old".into()),
            ("baseEmail", "a@example.com".into(), "a@example.com".into()),
        ]);
        merge(
            &mut stored,
            &attributes(&[("baseName", "New".into(), "New".into())]),
        );
        let mut lead = Lead::default();
        map_lead(&mut lead, stored, "");
        assert_eq!(lead.name, "New");
        assert_eq!(lead.emails, ["a@example.com"]);
    }

    #[test]
    fn texts_lose_the_whitespace_around_them_and_keep_the_rest() {
        let attributes = attributes(&[
            ("id", " 42 ".into(), " 42 ".into()),
            ("baseName", "  Toan  Truyen\t".into(), "x".into()),
            ("sourceType", "Zalo".into(), "Zalo".into()),
            (
                "baseEmail",
                serde_json::json!([" a@example.com", "b@example.com", "  "]),
                Value::Null,
            ),
        ]);
        assert_eq!(hana_id(&attributes), "42");
        let mut lead = Lead::default();
        map_lead(&mut lead, attributes, "");
        assert_eq!(lead.name, "Toan  Truyen");
        assert_eq!(lead.source_type, "Zalo");
        assert_eq!(lead.emails, ["a@example.com", "b@example.com"]);
    }
}
