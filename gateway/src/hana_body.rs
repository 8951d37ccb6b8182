//! Parses a Hana webhook body into a typed [`HanaWebhook`] without interpreting it: every
//! attribute is kept with its normalised and raw values, and unknown top-level fields are kept too.
//!
//! The body follows the Hana developer document:
//! `{"application":{"id":…}, "lead":{attr:{"nomalizeData":…,"rawData":…}}, "opportunity":{…},
//! "conversation":{"conversationUrl":…}}`. `nomalizeData` is Hana's spelling; `normalizeData` is
//! accepted too. Ids may be strings or numbers and are kept as opaque strings.

use std::{collections::BTreeMap, fmt};

use leadrelay_proto::v1::{HanaWebhook, RawAttribute};
use prost_types::{ListValue, Struct, Value, value::Kind};
use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};

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
///
/// In one pass over the bytes, straight into the protobuf types the call carries. Read into a
/// `serde_json::Value` first and then converted, every string and map was built twice: 3.2 µs
/// for the ingest benchmark's body and 3.6 µs for the seed's sample, against 1.8–1.9 and 2.1 µs
/// in one pass (300,000 parses each, on the 2-core development machine). The result is the
/// same for any bytes (a test and the `hana_body` fuzz target check it against that first
/// definition): the JSON must be whole and valid before any field's shape is judged, and a name
/// given twice counts with its last value.
pub fn parse_hana_body(raw: &[u8]) -> Result<HanaWebhook, HanaBodyError> {
    let mut json = serde_json::Deserializer::from_slice(raw);
    let body = de::DeserializeSeed::deserialize(ShapeOf(TopLevelReader), &mut json)
        .and_then(|body| json.end().map(|()| body))
        .map_err(|error| HanaBodyError::NotJson(error.to_string()))?;
    let Shape::Object(mut fields) = body else {
        return Err(HanaBodyError::NotAnObject);
    };

    let application = fields.application.take();
    // Ids are opaque strings: strings as they are, numbers in their JSON spelling.
    let application_id =
        match fields.section_key(application, "application", "an object with an `id`")? {
            Some(serde_json::Value::String(id)) => id.trim().to_owned(),
            Some(serde_json::Value::Number(number)) => number.to_string(),
            _ => String::new(),
        };
    let lead = attributes(fields.lead.take(), "lead")?;
    let opportunity = attributes(fields.opportunity.take(), "opportunity")?;
    let conversation = fields.conversation.take();
    let conversation_url = match fields.section_key(
        conversation,
        "conversation",
        "an object with a `conversationUrl`",
    )? {
        Some(serde_json::Value::String(url)) => url.trim().to_owned(),
        _ => String::new(),
    };
    let event_name = match fields.event_name.take() {
        Some(EventName::Text(name)) => name,
        Some(EventName::Other(other)) => {
            fields.extra.insert("event_name".to_owned(), other);
            String::new()
        }
        None => String::new(),
    };
    Ok(HanaWebhook {
        application_id,
        lead,
        opportunity,
        conversation_url,
        event_name,
        extra: (!fields.extra.is_empty()).then_some(Struct {
            fields: fields.extra,
        }),
    })
}

/// The attribute map of `lead` or `opportunity`, or why its shape is wrong.
fn attributes(
    section: Option<Shape<Attributes>>,
    field: &'static str,
) -> Result<Attributes, HanaBodyError> {
    match section {
        None | Some(Shape::Null) => Ok(Attributes::new()),
        Some(Shape::Object(attributes)) => Ok(attributes),
        Some(Shape::Other) => Err(HanaBodyError::WrongShape {
            field,
            expected: "an object of attributes",
        }),
    }
}

/// An attribute whose one value stands for both: a bare value, or one side of a pair.
fn bare(value: Value) -> RawAttribute {
    RawAttribute {
        normalized: Some(value.clone()),
        raw: Some(value),
    }
}

/// A value read where an object is expected: null, the object as `read` by its reader, or of
/// any other shape (read to its end all the same, so that the JSON is checked).
enum Shape<T> {
    Null,
    Object(T),
    Other,
}

/// Reads an object's members, for [`ShapeOf`].
trait ReadObject<'de> {
    type Object;

    fn read<A: MapAccess<'de>>(self, map: A) -> Result<Self::Object, A::Error>;
}

/// Reads a value as a [`Shape`] of what `R` reads from an object.
struct ShapeOf<R>(R);

impl<'de, R: ReadObject<'de>> de::DeserializeSeed<'de> for ShapeOf<R> {
    type Value = Shape<R::Object>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de, R: ReadObject<'de>> Visitor<'de> for ShapeOf<R> {
    type Value = Shape<R::Object>;

    fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("a JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        self.0.read(map).map(Shape::Object)
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Shape::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        // Read, not skipped with `IgnoredAny`: serde_json places some errors in a string it skips
        // a column off from where it places them when it reads the string, and a body's error
        // message is the one a `Value` gives.
        while seq.next_element::<ProtoValue>()?.is_some() {}
        Ok(Shape::Other)
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Ok(Shape::Other)
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
        Ok(Shape::Other)
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
        Ok(Shape::Other)
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Ok(Shape::Other)
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
        Ok(Shape::Other)
    }
}

/// The top-level fields, as read; each known one keeps the last value given under its name.
#[derive(Default)]
struct TopLevel {
    application: Option<Shape<Section>>,
    lead: Option<Shape<Attributes>>,
    opportunity: Option<Shape<Attributes>>,
    conversation: Option<Shape<Section>>,
    event_name: Option<EventName>,
    /// Fields LeadRelay does not know, and what remains of the known ones.
    extra: BTreeMap<String, Value>,
}

impl TopLevel {
    /// The key of `section` (`application`'s id, `conversation`'s URL), whatever else it holds
    /// kept in `extra`; `None` when the section is absent or null, and an error naming what it
    /// should be (`expected`) when it is not an object.
    fn section_key(
        &mut self,
        section: Option<Shape<Section>>,
        name: &'static str,
        expected: &'static str,
    ) -> Result<Option<serde_json::Value>, HanaBodyError> {
        match section {
            None | Some(Shape::Null) => Ok(None),
            Some(Shape::Object(section)) => {
                self.keep(name, section.rest);
                Ok(section.key)
            }
            Some(Shape::Other) => Err(HanaBodyError::WrongShape {
                field: name,
                expected,
            }),
        }
    }

    /// Keeps what remains of a known section in `extra`, when anything does.
    fn keep(&mut self, name: &str, rest: BTreeMap<String, Value>) {
        if !rest.is_empty() {
            self.extra.insert(
                name.to_owned(),
                Value {
                    kind: Some(Kind::StructValue(Struct { fields: rest })),
                },
            );
        }
    }
}

/// `event_name`: text (trimmed), or anything but null, which is kept in `extra`.
enum EventName {
    Text(String),
    Other(Value),
}

/// Reads the body's top level.
struct TopLevelReader;

impl<'de> ReadObject<'de> for TopLevelReader {
    // Boxed: the fields travel up through several results, and moving them cost ~5% of a parse.
    type Object = Box<TopLevel>;

    fn read<A: MapAccess<'de>>(self, mut map: A) -> Result<Box<TopLevel>, A::Error> {
        let mut fields = Box::<TopLevel>::default();
        while let Some(name) = map.next_key::<String>()? {
            match name.as_str() {
                "application" => {
                    fields.application = Some(map.next_value_seed(ShapeOf(SectionReader("id")))?);
                }
                "lead" => fields.lead = Some(map.next_value_seed(ShapeOf(AttributesReader))?),
                "opportunity" => {
                    fields.opportunity = Some(map.next_value_seed(ShapeOf(AttributesReader))?);
                }
                "conversation" => {
                    fields.conversation =
                        Some(map.next_value_seed(ShapeOf(SectionReader("conversationUrl")))?);
                }
                "event_name" => {
                    fields.event_name = match map.next_value::<ProtoValue>()?.0.kind {
                        Some(Kind::StringValue(name)) => {
                            Some(EventName::Text(name.trim().to_owned()))
                        }
                        None | Some(Kind::NullValue(_)) => None,
                        kind => Some(EventName::Other(Value { kind })),
                    };
                }
                _ => {
                    let ProtoValue(value) = map.next_value()?;
                    fields.extra.insert(name, value);
                }
            }
        }
        Ok(fields)
    }
}

/// `application` or `conversation`: its one known field (`id`, `conversationUrl`), read apart
/// from the rest.
struct Section {
    /// The known field, `None` when absent. A `serde_json::Value`, which keeps a number's
    /// spelling: an id may be a number, and ids are kept as written.
    key: Option<serde_json::Value>,
    /// The section's other fields.
    rest: BTreeMap<String, Value>,
}

/// Reads a section whose known field is `.0`.
struct SectionReader(&'static str);

impl<'de> ReadObject<'de> for SectionReader {
    type Object = Section;

    fn read<A: MapAccess<'de>>(self, mut map: A) -> Result<Section, A::Error> {
        let mut section = Section {
            key: None,
            rest: BTreeMap::new(),
        };
        while let Some(name) = map.next_key::<String>()? {
            if name == self.0 {
                section.key = Some(map.next_value()?);
            } else {
                let ProtoValue(value) = map.next_value()?;
                section.rest.insert(name, value);
            }
        }
        Ok(section)
    }
}

/// `lead` or `opportunity`: attributes by name.
type Attributes = std::collections::BTreeMap<String, RawAttribute>;

/// Reads the attributes of `lead` or `opportunity`.
struct AttributesReader;

impl<'de> ReadObject<'de> for AttributesReader {
    type Object = Attributes;

    fn read<A: MapAccess<'de>>(self, mut map: A) -> Result<Attributes, A::Error> {
        let mut attributes = Attributes::new();
        while let Some(name) = map.next_key::<String>()? {
            attributes.insert(name, map.next_value::<Attribute>()?.0);
        }
        Ok(attributes)
    }
}

/// One attribute. Normally `{nomalizeData, rawData}` (`normalizeData` is accepted too, and an
/// object with either keeps only them); any other value is taken as both, so nothing Hana sends
/// is dropped.
struct Attribute(RawAttribute);

impl<'de> Deserialize<'de> for Attribute {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(AttributeVisitor)
    }
}

/// A name in an attribute's object: one of the pair's, read without a copy, or any other.
enum PairName {
    Normalized,
    NormalizedCorrected,
    Raw,
    Other(String),
}

impl<'de> Deserialize<'de> for PairName {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_str(PairNameVisitor)
    }
}

struct PairNameVisitor;

impl<'de> Visitor<'de> for PairNameVisitor {
    type Value = PairName;

    fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("a name")
    }

    fn visit_str<E: de::Error>(self, name: &str) -> Result<PairName, E> {
        Ok(match name {
            "nomalizeData" => PairName::Normalized,
            "normalizeData" => PairName::NormalizedCorrected,
            "rawData" => PairName::Raw,
            other => PairName::Other(other.to_owned()),
        })
    }
}

struct AttributeVisitor;

impl<'de> Visitor<'de> for AttributeVisitor {
    type Value = Attribute;

    fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("a JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Attribute, A::Error> {
        let (mut normalized, mut corrected, mut raw) = (None, None, None);
        let mut rest = BTreeMap::new();
        while let Some(name) = map.next_key::<PairName>()? {
            let ProtoValue(value) = map.next_value()?;
            match name {
                PairName::Normalized => normalized = Some(value),
                PairName::NormalizedCorrected => corrected = Some(value),
                PairName::Raw => raw = Some(value),
                PairName::Other(name) => {
                    rest.insert(name, value);
                }
            }
        }
        // One side missing: the other stands in, so readers need not care which was sent.
        let attribute = match (normalized.or(corrected), raw) {
            (Some(normalized), Some(raw)) => RawAttribute {
                normalized: Some(normalized),
                raw: Some(raw),
            },
            (Some(only), None) | (None, Some(only)) => bare(only),
            (None, None) => bare(Value {
                kind: Some(Kind::StructValue(Struct { fields: rest })),
            }),
        };
        Ok(Attribute(attribute))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Attribute, A::Error> {
        ProtoValueVisitor.visit_seq(seq).map(Attribute::bare)
    }
    fn visit_unit<E: de::Error>(self) -> Result<Attribute, E> {
        ProtoValueVisitor.visit_unit().map(Attribute::bare)
    }
    fn visit_bool<E: de::Error>(self, flag: bool) -> Result<Attribute, E> {
        ProtoValueVisitor.visit_bool(flag).map(Attribute::bare)
    }
    fn visit_i64<E: de::Error>(self, number: i64) -> Result<Attribute, E> {
        ProtoValueVisitor.visit_i64(number).map(Attribute::bare)
    }
    fn visit_u64<E: de::Error>(self, number: u64) -> Result<Attribute, E> {
        ProtoValueVisitor.visit_u64(number).map(Attribute::bare)
    }
    fn visit_f64<E: de::Error>(self, number: f64) -> Result<Attribute, E> {
        ProtoValueVisitor.visit_f64(number).map(Attribute::bare)
    }
    fn visit_str<E: de::Error>(self, text: &str) -> Result<Attribute, E> {
        ProtoValueVisitor.visit_str(text).map(Attribute::bare)
    }
    fn visit_string<E: de::Error>(self, text: String) -> Result<Attribute, E> {
        ProtoValueVisitor.visit_string(text).map(Attribute::bare)
    }
}

impl Attribute {
    fn bare(ProtoValue(value): ProtoValue) -> Self {
        Self(bare(value))
    }
}

/// Any JSON value, read straight into a protobuf `Value`: numbers become doubles, and a name
/// given twice in an object keeps its last value.
struct ProtoValue(Value);

impl<'de> Deserialize<'de> for ProtoValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ProtoValueVisitor)
    }
}

struct ProtoValueVisitor;

impl ProtoValueVisitor {
    fn of(kind: Kind) -> ProtoValue {
        ProtoValue(Value { kind: Some(kind) })
    }
}

impl<'de> Visitor<'de> for ProtoValueVisitor {
    type Value = ProtoValue;

    fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("a JSON value")
    }

    fn visit_unit<E: de::Error>(self) -> Result<ProtoValue, E> {
        Ok(Self::of(Kind::NullValue(0)))
    }
    fn visit_bool<E: de::Error>(self, flag: bool) -> Result<ProtoValue, E> {
        Ok(Self::of(Kind::BoolValue(flag)))
    }
    // The same doubles `serde_json::Number::as_f64` gives.
    fn visit_i64<E: de::Error>(self, number: i64) -> Result<ProtoValue, E> {
        Ok(Self::of(Kind::NumberValue(number as f64)))
    }
    fn visit_u64<E: de::Error>(self, number: u64) -> Result<ProtoValue, E> {
        Ok(Self::of(Kind::NumberValue(number as f64)))
    }
    fn visit_f64<E: de::Error>(self, number: f64) -> Result<ProtoValue, E> {
        Ok(Self::of(Kind::NumberValue(number)))
    }
    fn visit_str<E: de::Error>(self, text: &str) -> Result<ProtoValue, E> {
        Ok(Self::of(Kind::StringValue(text.to_owned())))
    }
    fn visit_string<E: de::Error>(self, text: String) -> Result<ProtoValue, E> {
        Ok(Self::of(Kind::StringValue(text)))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<ProtoValue, A::Error> {
        let mut values = Vec::with_capacity(seq.size_hint().unwrap_or(0));
        while let Some(ProtoValue(value)) = seq.next_element()? {
            values.push(value);
        }
        Ok(Self::of(Kind::ListValue(ListValue { values })))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ProtoValue, A::Error> {
        let mut fields = BTreeMap::new();
        while let Some((name, ProtoValue(value))) = map.next_entry::<String, ProtoValue>()? {
            fields.insert(name, value);
        }
        Ok(Self::of(Kind::StructValue(Struct { fields })))
    }
}

#[cfg(test)]
mod first_definition;

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

    /// Bodies where reading in one pass could part from reading through a `Value`: names given
    /// twice, known fields of every shape, ids as numbers, errors of every kind and their order.
    #[test]
    fn the_one_pass_parser_reads_every_body_as_first_defined() {
        let deep = format!("{{\"x\":{}1{}}}", "[".repeat(200), "]".repeat(200));
        let bodies: Vec<&[u8]> = vec![
            SEED_SAMPLE.as_bytes(),
            b"{}",
            b"{} ",
            b"{} x",
            b"",
            b"{",
            b"[1,{\"a\":2}]",
            // A string with a control character where an object was expected: serde_json's
            // error column depends on whether it reads or skips the string.
            b"[\"applicati\0\0\0\0\0\0\0\0\0\0\0",
            br#"{"application":["a\u0001"], "x":"\u0002"}"#,
            b"{\"application\":{\"id\":[\"a\x01\"]}}",
            b"{\"conversation\":{\"conversationUrl\":{\"a\":\"\x02\"}}}",
            b"null",
            b"\"text\"",
            b"12",
            br#"{"lead":"x","lead":{"id":1}}"#,
            br#"{"lead":{"id":1},"lead":"x"}"#,
            br#"{"lead":{"a":null,"a":true}}"#,
            br#"{"application":{"id":"a"},"application":{"id":"b","x":1}}"#,
            br#"{"application":{"id":12345678901234567890}}"#,
            br#"{"application":{"id":1.5e3,"name":"bot"}}"#,
            br#"{"application":{"id":-7}}"#,
            br#"{"application":{"id":{"x":1}}}"#,
            br#"{"application":{"id":" a "}}"#,
            br#"{"application":{"id":"a","id":[1]}}"#,
            br#"{"application":[1]}"#,
            br#"{"application":null}"#,
            br#"{"application":{}}"#,
            br#"{"conversation":{"conversationUrl":5,"x":[1]}}"#,
            br#"{"conversation":"u"}"#,
            br#"{"conversation":{"conversationUrl":" u ","conversationUrl":null}}"#,
            br#"{"conversation":{"conversationUrl":" u "}}"#,
            br#"{"event_name":" lead.created "}"#,
            br#"{"event_name":{"a":1}}"#,
            br#"{"event_name":null}"#,
            br#"{"event_name":1,"event_name":"x"}"#,
            br#"{"event_name":"x","event_name":[2]}"#,
            br#"{"lead":{"a":{"nomalizeData":1,"normalizeData":2,"rawData":3,"z":4}}}"#,
            br#"{"lead":{"a":{"normalizeData":[1,{"b":null}]}}}"#,
            br#"{"lead":{"a":{"rawData":"r"}}}"#,
            br#"{"lead":{"a":{"other":1}}}"#,
            br#"{"opportunity":{"id":{"nomalizeData":"x","rawData":"y"}},"lead":null}"#,
            br#"{"conversation":1,"lead":1,"application":1}"#,
            br#"{"opportunity":[],"conversation":true}"#,
            br#"{"lead":{"n\u00e9":{"nomalizeData":"\ud83d\ude00"}},"x\"y":"\n"}"#,
            br#"{"x":1e400}"#,
            br#"{"x":-0,"y":0.1,"z":-12345678901234567890}"#,
            b"{\"x\":\"\xff\"}",
            deep.as_bytes(),
        ];
        for body in bodies {
            assert_eq!(
                parse_hana_body(body).map_err(|error| error.to_string()),
                first_definition::parse_as_first_defined(body),
                "body: {}",
                String::from_utf8_lossy(body)
            );
        }
    }
}
