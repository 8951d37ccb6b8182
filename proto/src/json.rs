//! Conversions between JSON and `google.protobuf.Value`/`Struct`, for bodies kept as received.

use prost_types::{ListValue, Struct, Value, value::Kind};

/// Converts a JSON value into a protobuf `Value`. Numbers become doubles, as `Value` requires;
/// callers that need exact decimals keep the raw body as well.
pub fn to_proto_value(json: serde_json::Value) -> Value {
    let kind = match json {
        serde_json::Value::Null => Kind::NullValue(0),
        serde_json::Value::Bool(flag) => Kind::BoolValue(flag),
        serde_json::Value::Number(number) => Kind::NumberValue(number.as_f64().unwrap_or(f64::NAN)),
        serde_json::Value::String(text) => Kind::StringValue(text),
        serde_json::Value::Array(items) => Kind::ListValue(ListValue {
            values: items.into_iter().map(to_proto_value).collect(),
        }),
        serde_json::Value::Object(fields) => Kind::StructValue(to_proto_struct(fields)),
    };
    Value { kind: Some(kind) }
}

/// Converts a JSON object into a protobuf `Struct`.
pub fn to_proto_struct(fields: serde_json::Map<String, serde_json::Value>) -> Struct {
    Struct {
        fields: fields
            .into_iter()
            .map(|(name, value)| (name, to_proto_value(value)))
            .collect(),
    }
}

/// Converts a protobuf `Value` back into JSON. Whole doubles become integers, so `1` stays `1`.
pub fn from_proto_value(value: &Value) -> serde_json::Value {
    match &value.kind {
        None | Some(Kind::NullValue(_)) => serde_json::Value::Null,
        Some(Kind::BoolValue(flag)) => serde_json::Value::Bool(*flag),
        Some(Kind::NumberValue(number)) => number_to_json(*number),
        Some(Kind::StringValue(text)) => serde_json::Value::String(text.clone()),
        Some(Kind::ListValue(list)) => {
            serde_json::Value::Array(list.values.iter().map(from_proto_value).collect())
        }
        Some(Kind::StructValue(fields)) => serde_json::Value::Object(from_proto_struct(fields)),
    }
}

/// Converts a protobuf `Struct` back into a JSON object.
pub fn from_proto_struct(fields: &Struct) -> serde_json::Map<String, serde_json::Value> {
    fields
        .fields
        .iter()
        .map(|(name, value)| (name.clone(), from_proto_value(value)))
        .collect()
}

fn number_to_json(number: f64) -> serde_json::Value {
    // Exactly representable whole numbers round-trip as integers.
    const MAX_EXACT: f64 = 9_007_199_254_740_992.0;
    if number.fract() == 0.0 && number.abs() <= MAX_EXACT {
        #[allow(clippy::cast_possible_truncation)]
        return serde_json::Value::from(number as i64);
    }
    serde_json::Number::from_f64(number).map_or(serde_json::Value::Null, serde_json::Value::Number)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_round_trips_through_proto_values() {
        let json = serde_json::json!({
            "text": "Toan Truyen",
            "number": 1.09,
            "whole": 1,
            "list": ["Youtube", "Sendo"],
            "nested": {"flag": true, "nothing": null}
        });
        assert_eq!(from_proto_value(&to_proto_value(json.clone())), json);
    }
}
