//! The Hana body parser as it was first written: through a `serde_json::Value`, then converted.
//! The parser in use reads the body in one pass and must give the same webhook, or the same
//! error message, for any bytes. One file for the module's tests and the `hana_body` fuzz target,
//! which includes it by path: both check against the same definition.

use leadrelay_proto::{
    json::{to_proto_struct, to_proto_value},
    v1::{HanaWebhook, RawAttribute},
};
use serde_json::{Map, Value};

/// The body parsed as first defined; the error is its message.
pub(crate) fn parse_as_first_defined(raw: &[u8]) -> Result<HanaWebhook, String> {
    let json: Value = serde_json::from_slice(raw)
        .map_err(|error| format!("the body is not valid JSON: {error}"))?;
    let Value::Object(mut body) = json else {
        return Err("the body is JSON but not an object".to_owned());
    };
    let application_id = match body.remove("application") {
        None | Some(Value::Null) => String::new(),
        Some(Value::Object(mut application)) => {
            let id = opaque_id(application.remove("id"));
            if !application.is_empty() {
                body.insert("application".to_owned(), Value::Object(application));
            }
            id
        }
        Some(_) => return Err("`application` must be an object with an `id`".to_owned()),
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
            return Err("`conversation` must be an object with a `conversationUrl`".to_owned());
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

fn opaque_id(value: Option<Value>) -> String {
    match value {
        Some(Value::String(id)) => id.trim().to_owned(),
        Some(Value::Number(number)) => number.to_string(),
        _ => String::new(),
    }
}

fn attributes(
    value: Option<Value>,
    field: &str,
) -> Result<std::collections::BTreeMap<String, RawAttribute>, String> {
    let attributes: Map<String, Value> = match value {
        None | Some(Value::Null) => return Ok(Default::default()),
        Some(Value::Object(attributes)) => attributes,
        Some(_) => return Err(format!("`{field}` must be an object of attributes")),
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
