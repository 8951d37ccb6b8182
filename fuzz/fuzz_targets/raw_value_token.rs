//! Whether a body names serde_json's raw-value token: `serde_json::Value` (its `raw_value`
//! feature is on) reads an object whose first name is that token as raw JSON text, a documented
//! difference from any reader of its own. The fuzz targets that check such a reader against a
//! `Value` skip these bodies.

use std::{cell::Cell, fmt};

use serde::de::{DeserializeSeed, Deserializer as _, MapAccess, SeqAccess, Visitor};

/// The name serde_json's `Value` reads as raw JSON text when it comes first in an object (its
/// `raw_value` feature is on): the one documented difference, skipped here.
const RAW_VALUE_TOKEN: &str = "$serde_json::private::RawValue";

/// Whether any object in the body, read as JSON, names the raw-value token (escapes decoded),
/// also when the JSON turns out invalid after it: a `Value` stops at the token with an error of
/// its own.
pub(crate) fn names_the_raw_value_token(data: &[u8]) -> bool {
    let found = Cell::new(false);
    let mut deserializer = serde_json::Deserializer::from_slice(data);
    // Invalid JSON ends the walk; what it found until then stands.
    let _ = deserializer.deserialize_any(TokenFinder(&found));
    found.get()
}

/// Walks a JSON document and sets its flag once an object names [`RAW_VALUE_TOKEN`].
#[derive(Clone, Copy)]
struct TokenFinder<'f>(&'f Cell<bool>);

impl<'de> Visitor<'de> for TokenFinder<'_> {
    type Value = ();

    fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("any JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }

    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }

    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }

    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }

    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }

    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut items: A) -> Result<(), A::Error> {
        while items.next_element_seed(self)?.is_some() {}
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut members: A) -> Result<(), A::Error> {
        while let Some(name) = members.next_key::<String>()? {
            if name == RAW_VALUE_TOKEN {
                self.0.set(true);
            }
            members.next_value_seed(self)?;
        }
        Ok(())
    }
}

impl<'de> DeserializeSeed<'de> for TokenFinder<'_> {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}
