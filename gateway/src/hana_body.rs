//! Parses a Hana webhook body into a typed [`HanaWebhook`] without interpreting it: every
//! attribute is kept with its normalised and raw values, and unknown top-level fields are kept too.
//!
//! The body follows the Hana developer document:
//! `{"application":{"id":…}, "lead":{attr:{"nomalizeData":…,"rawData":…}}, "opportunity":{…},
//! "conversation":{"conversationUrl":…}}`. `nomalizeData` is Hana's spelling; `normalizeData` is
//! accepted too. Ids may be strings or numbers and are kept as opaque strings.

use leadrelay_proto::{
    json::{to_proto_struct, to_proto_value},
    v1::{HanaWebhook, RawAttribute},
};
use serde_json::{Map, Value};

/// Why a body could not be parsed; the message goes to quarantine with the body.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum HanaBodyError {
    /// The body is not JSON.
    #[error("the body is not valid JSON: {0}")]
    NotJson(String),
    /// The body is JSON but not an object.
    #[error("the body is JSON but not an object")]
    NotAnObject,
    /// A known field has the wrong shape.
    #[error("`{field}` must be {expected}")]
    WrongShape {
        /// The field, e.g. `lead`.
        field: &'static str,
        /// What it must be.
        expected: &'static str,
    },
}

/// Parses a Hana webhook body.
pub fn parse_hana_body(raw: &[u8]) -> Result<HanaWebhook, HanaBodyError> {
    let json: Value =
        serde_json::from_slice(raw).map_err(|error| HanaBodyError::NotJson(error.to_string()))?;
    let Value::Object(mut body) = json else {
        return Err(HanaBodyError::NotAnObject);
    };

    let application_id = match body.remove("application") {
        None | Some(Value::Null) => String::new(),
        Some(Value::Object(mut application)) => {
            let id = opaque_id(application.remove("id"));
            if !application.is_empty() {
                // Keep whatever else Hana sends about the application.
                body.insert("application".to_owned(), Value::Object(application));
            }
            id
        }
        Some(_) => {
            return Err(HanaBodyError::WrongShape {
                field: "application",
                expected: "an object with an `id`",
            });
        }
    };
    let lead = attributes(body.remove("lead"), "lead")?;
    let opportunity = attributes(body.remove("opportunity"), "opportunity")?;
    let conversation_url = match body.remove("conversation") {
        None | Some(Value::Null) => String::new(),
        Some(Value::Object(mut conversation)) => {
            let url = match conversation.remove("conversationUrl") {
                Some(Value::String(url)) => url.trim().to_owned(),
                _ => String::new(),
            };
            if !conversation.is_empty() {
                body.insert("conversation".to_owned(), Value::Object(conversation));
            }
            url
        }
        Some(_) => {
            return Err(HanaBodyError::WrongShape {
                field: "conversation",
                expected: "an object with a `conversationUrl`",
            });
        }
    };
    let event_name = match body.remove("event_name") {
        Some(Value::String(name)) => name.trim().to_owned(),
        Some(other) if !other.is_null() => {
            body.insert("event_name".to_owned(), other);
            String::new()
        }
        _ => String::new(),
    };
    Ok(HanaWebhook {
        application_id,
        lead,
        opportunity,
        conversation_url,
        event_name,
        extra: (!body.is_empty()).then(|| to_proto_struct(body)),
    })
}

/// An id as an opaque string: strings are kept as they are, numbers in their JSON spelling.
fn opaque_id(value: Option<Value>) -> String {
    match value {
        Some(Value::String(id)) => id.trim().to_owned(),
        Some(Value::Number(number)) => number.to_string(),
        _ => String::new(),
    }
}

/// Reads an attribute map. Each attribute is normally `{nomalizeData, rawData}`; a bare value is
/// taken as both, so nothing Hana sends is dropped.
fn attributes(
    value: Option<Value>,
    field: &'static str,
) -> Result<std::collections::HashMap<String, RawAttribute>, HanaBodyError> {
    let attributes: Map<String, Value> = match value {
        None | Some(Value::Null) => return Ok(Default::default()),
        Some(Value::Object(attributes)) => attributes,
        Some(_) => {
            return Err(HanaBodyError::WrongShape {
                field,
                expected: "an object of attributes",
            });
        }
    };
    Ok(attributes
        .into_iter()
        .map(|(name, value)| (name, raw_attribute(value)))
        .collect())
}

fn raw_attribute(value: Value) -> RawAttribute {
    match value {
        Value::Object(mut pair)
            if pair.contains_key("nomalizeData")
                || pair.contains_key("normalizeData")
                || pair.contains_key("rawData") =>
        {
            let normalized = pair
                .remove("nomalizeData")
                .or_else(|| pair.remove("normalizeData"));
            let raw = pair.remove("rawData");
            // One side missing: the other stands in, so readers need not care which was sent.
            let (normalized, raw) = match (normalized, raw) {
                (Some(normalized), Some(raw)) => (normalized, raw),
                (Some(only), None) | (None, Some(only)) => (only.clone(), only),
                (None, None) => (Value::Null, Value::Null),
            };
            RawAttribute {
                normalized: Some(to_proto_value(normalized)),
                raw: Some(to_proto_value(raw)),
            }
        }
        bare => RawAttribute {
            normalized: Some(to_proto_value(bare.clone())),
            raw: Some(to_proto_value(bare)),
        },
    }
}

#[cfg(test)]
mod tests {
    use leadrelay_proto::json::from_proto_value;

    use super::*;

    /// The sample body of the Hana developer document, with its typographic quotes made ASCII.
    const SEED_SAMPLE: &str = include_str!("../../tests/fixtures/hana-seed-sample.json");

    fn normalized(webhook: &HanaWebhook, name: &str) -> serde_json::Value {
        webhook.lead[name]
            .normalized
            .as_ref()
            .map(from_proto_value)
            .unwrap_or_default()
    }

    #[test]
    fn the_seed_sample_keeps_every_attribute() -> Result<(), HanaBodyError> {
        let webhook = parse_hana_body(SEED_SAMPLE.as_bytes())?;
        assert_eq!(
            webhook.application_id,
            "dbd9a5f7-b3c4-45bb-a8eb-2b8e10bff8c2"
        );
        assert_eq!(webhook.lead.len(), 7);
        assert_eq!(normalized(&webhook, "baseName"), "Toan Truyen");
        assert_eq!(normalized(&webhook, "basePhonenumber"), "0978712200");
        assert_eq!(normalized(&webhook, "cf_number_kieu_so"), 1.09);
        assert_eq!(
            normalized(&webhook, "baseSourceInput"),
            serde_json::json!(["Youtube", "Sendo"])
        );
        let birthday_raw = webhook.lead["baseBirthday"]
            .raw
            .as_ref()
            .map(from_proto_value);
        assert_eq!(
            birthday_raw,
            Some(serde_json::json!("2020-09-13T17:00:00.000Z"))
        );
        assert!(
            webhook
                .conversation_url
                .ends_with("/chats/5e6f3f81da043f97f8ae0c44")
        );
        assert!(webhook.opportunity.is_empty());
        assert_eq!(webhook.extra, None);
        Ok(())
    }

    #[test]
    fn the_corrected_spelling_bare_values_and_numeric_ids_are_accepted() -> Result<(), HanaBodyError>
    {
        let webhook = parse_hana_body(
            br#"{"application":{"id":42},"event_name":"lead.updated",
                 "lead":{"id":{"normalizeData":7},"baseName":"Plain","cf_string_x":{"rawData":"only raw"}},
                 "future_field":{"kept":true}}"#,
        )?;
        assert_eq!(webhook.application_id, "42");
        assert_eq!(webhook.event_name, "lead.updated");
        assert_eq!(normalized(&webhook, "id"), 7);
        assert_eq!(normalized(&webhook, "baseName"), "Plain");
        assert_eq!(normalized(&webhook, "cf_string_x"), "only raw");
        let extra = webhook
            .extra
            .map(|extra| leadrelay_proto::json::from_proto_struct(&extra));
        assert_eq!(
            extra.map(serde_json::Value::Object),
            Some(serde_json::json!({"future_field": {"kept": true}}))
        );
        Ok(())
    }

    #[test]
    fn unusable_bodies_say_why() {
        assert!(matches!(
            parse_hana_body(b"{not json"),
            Err(HanaBodyError::NotJson(_))
        ));
        assert_eq!(parse_hana_body(b"[1,2]"), Err(HanaBodyError::NotAnObject));
        assert_eq!(
            parse_hana_body(br#"{"lead":"nope"}"#)
                .err()
                .map(|error| error.to_string()),
            Some("`lead` must be an object of attributes".to_owned())
        );
    }
}
