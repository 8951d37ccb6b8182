//! The hash a redelivered Hana call is recognised by: of its kind, its application and its body
//! with object keys sorted at every level and no whitespace, so that a redelivery serialised
//! differently still matches. Events are stored under it and their entity's id
//! (`group::dedupe_key`).
//!
//! Every webhook is hashed, so the body is read into a tree that borrows its strings from the body
//! (a string is copied only when it holds an escape) rather than into a `serde_json::Value`, and
//! the canonical text is written into one buffer and hashed in one piece. The hash must never
//! change: events are stored under it, and a redelivery of an event stored by an earlier version
//! must still match. The tests compare it with the canonical text of a `serde_json::Value`, which
//! it was first defined as. One body differs: an object whose first name is serde_json's private
//! raw-value token (`$serde_json::private::RawValue`), which a `Value` reads as the JSON text
//! inside its string (the `raw_value` feature is on in the workspace). Here it is an object like
//! any other; no Hana body names that token.

use std::{borrow::Cow, fmt, io::Write as _};

use leadrelay_proto::v1::{HanaEventKind, HanaWebhook};
use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use sha2::{Digest, Sha256};

/// The content hash of a call, in lower-case hex. A body that is not JSON is hashed as it is.
pub(super) fn content_hash(kind: HanaEventKind, webhook: &HanaWebhook, raw_body: &[u8]) -> String {
    let mut hasher = Sha256::new();
    for part in [kind.event_name(), webhook.application_id.as_str()] {
        hasher.update(part.as_bytes());
        hasher.update([0]);
    }
    match serde_json::from_slice::<Json<'_>>(raw_body) {
        Ok(json) => {
            // The canonical text is about as long as the body. It is hashed in one piece: the
            // hasher's bookkeeping for its ~150 small pieces (names, values, punctuation) cost
            // more than writing them into a buffer.
            let mut canonical = Vec::with_capacity(raw_body.len());
            json.write(&mut canonical);
            hasher.update(&canonical);
        }
        Err(_) => hasher.update(raw_body),
    }
    hasher.update([0]);
    hex(&hasher.finalize())
}

/// A JSON document whose strings borrow from the text it was read from where they can.
enum Json<'a> {
    Null,
    Bool(bool),
    Number(serde_json::Number),
    String(Cow<'a, str>),
    Array(Vec<Json<'a>>),
    /// Members sorted by name, each name once (the last one given, as `serde_json::Map` keeps).
    Object(Vec<(Cow<'a, str>, Json<'a>)>),
}

impl Json<'_> {
    /// Writes the canonical text: members in name order, no whitespace, strings escaped as
    /// serde_json escapes them, numbers as serde_json prints them.
    fn write(&self, out: &mut Vec<u8>) {
        match self {
            Self::Null => out.extend_from_slice(b"null"),
            Self::Bool(true) => out.extend_from_slice(b"true"),
            Self::Bool(false) => out.extend_from_slice(b"false"),
            // Writing into a `Vec` cannot fail.
            Self::Number(number) => {
                let _ = write!(out, "{number}");
            }
            Self::String(text) => write_string(text, out),
            Self::Array(items) => {
                out.push(b'[');
                for (position, item) in items.iter().enumerate() {
                    if position > 0 {
                        out.push(b',');
                    }
                    item.write(out);
                }
                out.push(b']');
            }
            Self::Object(members) => {
                out.push(b'{');
                for (position, (name, value)) in members.iter().enumerate() {
                    if position > 0 {
                        out.push(b',');
                    }
                    write_string(name, out);
                    out.push(b':');
                    value.write(out);
                }
                out.push(b'}');
            }
        }
    }
}

/// A JSON string literal, escaped as serde_json escapes it.
fn write_string(text: &str, out: &mut Vec<u8>) {
    // Writing a string into a `Vec` cannot fail.
    let _ = serde_json::to_writer(out, text);
}

/// Lower-case hex.
fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut text = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        text.push(char::from(DIGITS[usize::from(byte >> 4)]));
        text.push(char::from(DIGITS[usize::from(byte & 0x0f)]));
    }
    text
}

/// A string that borrows from the document when it holds no escape.
struct Text<'a>(Cow<'a, str>);

struct TextVisitor;

impl<'de> Visitor<'de> for TextVisitor {
    type Value = Text<'de>;

    fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("a string")
    }

    fn visit_borrowed_str<E>(self, text: &'de str) -> Result<Self::Value, E> {
        Ok(Text(Cow::Borrowed(text)))
    }

    fn visit_str<E>(self, text: &str) -> Result<Self::Value, E> {
        Ok(Text(Cow::Owned(text.to_owned())))
    }

    fn visit_string<E>(self, text: String) -> Result<Self::Value, E> {
        Ok(Text(Cow::Owned(text)))
    }
}

impl<'de> Deserialize<'de> for Text<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_str(TextVisitor)
    }
}

struct JsonVisitor;

impl<'de> Visitor<'de> for JsonVisitor {
    type Value = Json<'de>;

    fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("any JSON value")
    }

    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(Json::Null)
    }

    fn visit_bool<E>(self, value: bool) -> Result<Self::Value, E> {
        Ok(Json::Bool(value))
    }

    fn visit_u64<E>(self, value: u64) -> Result<Self::Value, E> {
        Ok(Json::Number(value.into()))
    }

    fn visit_i64<E>(self, value: i64) -> Result<Self::Value, E> {
        Ok(Json::Number(value.into()))
    }

    fn visit_f64<E>(self, value: f64) -> Result<Self::Value, E> {
        // As serde_json's Value: a float JSON cannot hold (it never parses one) reads as null.
        Ok(serde_json::Number::from_f64(value).map_or(Json::Null, Json::Number))
    }

    fn visit_borrowed_str<E>(self, text: &'de str) -> Result<Self::Value, E> {
        Ok(Json::String(Cow::Borrowed(text)))
    }

    fn visit_str<E>(self, text: &str) -> Result<Self::Value, E> {
        Ok(Json::String(Cow::Owned(text.to_owned())))
    }

    fn visit_string<E>(self, text: String) -> Result<Self::Value, E> {
        Ok(Json::String(Cow::Owned(text)))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut items: A) -> Result<Self::Value, A::Error> {
        let mut array = Vec::with_capacity(items.size_hint().unwrap_or(0));
        while let Some(item) = items.next_element()? {
            array.push(item);
        }
        Ok(Json::Array(array))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut fields: A) -> Result<Self::Value, A::Error> {
        let mut members: Vec<(Cow<'de, str>, Json<'de>)> = Vec::new();
        while let Some((Text(name), value)) = fields.next_entry::<Text<'de>, Json<'de>>()? {
            members.push((name, value));
        }
        // Last given first, then a stable sort by name: of a name given twice, the last value
        // comes first and is the one kept.
        members.reverse();
        members.sort_by(|left, right| left.0.cmp(&right.0));
        members.dedup_by(|later, kept| later.0 == kept.0);
        Ok(Json::Object(members))
    }
}

impl<'de> Deserialize<'de> for Json<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(JsonVisitor)
    }
}

#[cfg(test)]
mod first_definition;

#[cfg(test)]
mod tests {
    use super::*;

    fn webhook() -> HanaWebhook {
        HanaWebhook {
            application_id: "app".to_owned(),
            ..Default::default()
        }
    }

    /// The hash as first defined, for the application of [`webhook`].
    fn hash_as_first_defined(kind: HanaEventKind, raw_body: &[u8]) -> String {
        super::first_definition::hash_as_first_defined(kind, "app", raw_body)
    }

    #[test]
    fn the_hash_is_the_one_stored_events_were_keyed_by() {
        let bodies: &[&[u8]] = &[
            include_bytes!("../../../../tests/fixtures/hana-seed-sample.json"),
            include_bytes!("../../../../fuzz/corpus/hana_body/ticket.json"),
            br#"{"b":[{"y":1,"x":"\"q\""}],"a":null,"c":1.5}"#,
            br#"{"same":1,"other":true,"same":{"z":[],"a":{}}}"#,
            br#"{"escaped\u00e9\n":"tab\there \ud83d\ude00 / \/","plain":"d\u00fcr"}"#,
            br#"{"n":[0,-0,-1,18446744073709551615,18446744073709551616,-9223372036854775808,1e3,1.0,2.5E-7,-0.0,123456789.123456789]}"#,
            br#"  [ 1 , "x" , { "k" : false } ]  "#,
            b"\"just a string\"",
            b"42",
            b"null",
            b"{not json",
            b"",
            "{\"vi\":\"Toàn Truyền\",\"ctl\":\"\\u0001\\u001f\\u007f\"}".as_bytes(),
        ];
        for body in bodies {
            assert_eq!(
                content_hash(HanaEventKind::LeadCreated, &webhook(), body),
                hash_as_first_defined(HanaEventKind::LeadCreated, body),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    /// Writes random JSON text: nested objects with repeated names, escapes, non-ASCII text,
    /// numbers of every shape and random whitespace, from a seeded xorshift generator.
    struct RandomJson(u64);

    impl RandomJson {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn pick<'a>(&mut self, choices: &[&'a str]) -> &'a str {
            let index = usize::try_from(self.next() % choices.len() as u64).unwrap_or(0);
            choices[index]
        }

        fn blank(&mut self, text: &mut String) {
            text.push_str(self.pick(&["", "", " ", "\n  ", "\t"]));
        }

        fn string(&mut self, text: &mut String) {
            text.push('"');
            for _ in 0..self.next() % 4 {
                text.push_str(self.pick(&[
                    "id",
                    "a",
                    "b",
                    "Toàn",
                    "\\\"",
                    "\\u00e9",
                    "\\n",
                    "\\/",
                    "\\ud83d\\ude00",
                    "\\u0001",
                    "x y",
                    "\u{7f}",
                ]));
            }
            text.push('"');
        }

        fn value(&mut self, text: &mut String, depth: u32) {
            self.blank(text);
            match self.next() % if depth > 3 { 4 } else { 6 } {
                0 => self.string(text),
                1 => text.push_str(self.pick(&[
                    "0",
                    "-0",
                    "1.09",
                    "-1",
                    "1e3",
                    "2.5E-7",
                    "-0.0",
                    "18446744073709551615",
                    "18446744073709551616",
                    "-9223372036854775808",
                    "123456789.123456789",
                    "1.0",
                ])),
                2 => text.push_str(self.pick(&["true", "false", "null"])),
                3 => self.string(text),
                4 => {
                    text.push('[');
                    for position in 0..self.next() % 4 {
                        if position > 0 {
                            text.push(',');
                        }
                        self.value(text, depth + 1);
                    }
                    text.push(']');
                }
                _ => {
                    text.push('{');
                    for position in 0..self.next() % 5 {
                        if position > 0 {
                            text.push(',');
                        }
                        self.blank(text);
                        self.string(text);
                        self.blank(text);
                        text.push(':');
                        self.value(text, depth + 1);
                    }
                    text.push('}');
                }
            }
            self.blank(text);
        }
    }

    #[test]
    fn the_hash_of_random_documents_is_the_one_first_defined() {
        let mut random = RandomJson(0x9e37_79b9_7f4a_7c15);
        let mut parsed = 0;
        for _ in 0..20_000 {
            let mut body = String::new();
            random.value(&mut body, 0);
            parsed += usize::from(serde_json::from_str::<serde_json::Value>(&body).is_ok());
            assert_eq!(
                content_hash(HanaEventKind::LeadUpdated, &webhook(), body.as_bytes()),
                hash_as_first_defined(HanaEventKind::LeadUpdated, body.as_bytes()),
                "{body}"
            );
        }
        // Most documents must be JSON, or the comparison would test the fallback alone.
        assert!(parsed > 15_000, "only {parsed} of 20000 documents parsed");
    }

    #[test]
    fn the_hash_ignores_key_order_and_whitespace_but_not_the_kind() {
        let a = content_hash(
            HanaEventKind::LeadCreated,
            &webhook(),
            br#"{"a":1,"b":{"c":[1,2]}}"#,
        );
        let b = content_hash(
            HanaEventKind::LeadCreated,
            &webhook(),
            b"{ \"b\": {\"c\": [1, 2]}, \"a\": 1 }",
        );
        assert_eq!(a, b);
        assert_ne!(
            a,
            content_hash(
                HanaEventKind::LeadUpdated,
                &webhook(),
                br#"{"a":1,"b":{"c":[1,2]}}"#
            )
        );
    }
}
