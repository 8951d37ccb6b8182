//! Field mapping from the config file: which Hana attribute fills which field of each CRM, and
//! which Hana attributes receive what the CRMs did.
//!
//! ```toml
//! # Hana attribute = Pipedrive custom field key (40 characters; GET /v1/personFields lists them).
//! [mappings.pipedrive.person]
//! cf_string_cong_ty = "9dc80c50d78a15643bfc4ca79d76156a73a1ca0e"
//!
//! [mappings.pipedrive.deal]
//! cf_number_ngan_sach = "1f6a09f3b8c2d4e5a6b7c8d9e0f1a2b3c4d5e6f7"
//!
//! # Hana attribute = SalesMan lead parameter.
//! [mappings.salesman]
//! cf_string_cong_ty = "company"
//! cf_string_thanh_pho = "city"
//!
//! # What LeadRelay writes back = the Hana attribute that receives it ("" writes nothing).
//! [mappings.hana]
//! pipedrive_person_id = "cf_string_pipedrive_id"
//! sales_status = ""
//! ```
//!
//! Every mapping is optional: without any, leads and deals carry their predefined fields and the
//! write-back goes to the `cf_string_…` attributes of [`HanaWriteBack::default`]. A mistake stops
//! start-up naming the file, the line and the reason.

use std::{collections::BTreeMap, path::Path};

use leadrelay_proto::{json::from_proto_value, v1::RawAttribute};
use serde::Deserialize;
use serde_json::Value;
use toml::Spanned;

use crate::{ConfigError, config::ConfigText};

/// SalesMan `add` parameters a mapping may fill; the others LeadRelay sets itself.
const SALESMAN_PARAMETERS: [&str; 10] = [
    "company",
    "ip",
    "country",
    "city",
    "partner",
    "user",
    "utm_medium",
    "utm_campaign",
    "utm_term",
    "utm_content",
];

/// SalesMan parameters LeadRelay fills from the lead itself.
const SALESMAN_OWN: [&str; 6] = [
    "title",
    "email",
    "phone",
    "description",
    "path",
    "utm_source",
];

/// The Hana attributes LeadRelay writes into, by what it writes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HanaWriteBack {
    /// On the lead: the Pipedrive person id.
    pub pipedrive_person_id: String,
    /// On the lead: the SalesMan lead id.
    pub salesman_lead_id: String,
    /// On the lead: where sales stands with it ("open", "in_work", "processed", "closed").
    pub sales_status: String,
    /// On the ticket: the Pipedrive deal id.
    pub pipedrive_deal_id: String,
    /// On the ticket: the deal's status ("open", "won", "lost", "deleted").
    pub deal_status: String,
    /// On the ticket: why the deal was lost.
    pub lost_reason: String,
    /// On the ticket: the deal's stage id in its CRM.
    pub stage_id: String,
}

impl Default for HanaWriteBack {
    fn default() -> Self {
        Self {
            pipedrive_person_id: "cf_string_pipedrive_person_id".to_owned(),
            salesman_lead_id: "cf_string_salesman_lead_id".to_owned(),
            sales_status: "cf_string_sales_status".to_owned(),
            pipedrive_deal_id: "cf_string_pipedrive_deal_id".to_owned(),
            deal_status: "cf_string_deal_status".to_owned(),
            lost_reason: "cf_string_lost_reason".to_owned(),
            stage_id: "cf_string_deal_stage_id".to_owned(),
        }
    }
}

impl HanaWriteBack {
    /// The attribute slot named `what` in the config file.
    fn slot(&mut self, what: &str) -> Option<&mut String> {
        Some(match what {
            "pipedrive_person_id" => &mut self.pipedrive_person_id,
            "salesman_lead_id" => &mut self.salesman_lead_id,
            "sales_status" => &mut self.sales_status,
            "pipedrive_deal_id" => &mut self.pipedrive_deal_id,
            "deal_status" => &mut self.deal_status,
            "lost_reason" => &mut self.lost_reason,
            "stage_id" => &mut self.stage_id,
            _ => return None,
        })
    }
}

/// One Hana attribute copied into a CRM field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldMapping {
    /// The Hana attribute, e.g. `cf_string_cong_ty`.
    pub attribute: String,
    /// The CRM field: a Pipedrive custom field key or a SalesMan parameter.
    pub field: String,
}

/// The mappings of the config file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Mappings {
    /// Hana lead attributes → Pipedrive person custom fields.
    pub pipedrive_person: Vec<FieldMapping>,
    /// Hana ticket attributes → Pipedrive deal custom fields.
    pub pipedrive_deal: Vec<FieldMapping>,
    /// Hana lead attributes → SalesMan lead parameters.
    pub salesman: Vec<FieldMapping>,
    /// Where Hana receives what the CRMs did.
    pub hana: HanaWriteBack,
}

/// The value of attribute `name` in `raw`: the normalised value unless it is missing or null,
/// else the raw one; `None` when the attribute is absent or null either way.
pub fn attribute_value(
    raw: &std::collections::BTreeMap<String, RawAttribute>,
    name: &str,
) -> Option<Value> {
    let attribute = raw.get(name)?;
    [attribute.normalized.as_ref(), attribute.raw.as_ref()]
        .into_iter()
        .flatten()
        .map(from_proto_value)
        .find(|value| !value.is_null())
}

/// A value as one line of text: arrays joined with ", ", numbers and booleans as written.
pub fn value_text(value: &Value) -> String {
    match value {
        Value::String(text) => text.trim().to_owned(),
        Value::Array(items) => items
            .iter()
            .map(value_text)
            .filter(|text| !text.is_empty())
            .collect::<Vec<_>>()
            .join(", "),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

type SpannedMap = BTreeMap<Spanned<String>, Spanned<String>>;

#[derive(Deserialize)]
struct File {
    #[serde(default)]
    mappings: Option<RawMappings>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMappings {
    #[serde(default)]
    pipedrive: RawPipedrive,
    #[serde(default)]
    salesman: SpannedMap,
    #[serde(default)]
    hana: SpannedMap,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPipedrive {
    #[serde(default)]
    person: SpannedMap,
    #[serde(default)]
    deal: SpannedMap,
}

fn is_attribute_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|character| character.is_ascii_alphanumeric() || character == '_')
}

fn is_pipedrive_key(key: &str) -> bool {
    key.len() == 40 && key.chars().all(|character| character.is_ascii_hexdigit())
}

/// The mappings in the config file `text` (read from `path`).
pub fn parse(path: &Path, text: &str) -> Result<Mappings, ConfigError> {
    let config = ConfigText { path, text };
    let at = |span| config.at(span);
    let file: File = config.deserialize()?;
    let raw = file.mappings.unwrap_or_default();
    let attribute = |name: &Spanned<String>| -> Result<String, ConfigError> {
        let trimmed = name.get_ref().trim();
        if is_attribute_name(trimmed) {
            Ok(trimmed.to_owned())
        } else {
            Err(ConfigError::new(
                at(name.span()),
                format!(
                    "'{}' is not a Hana attribute name: use the attribute's key, e.g. baseName or cf_string_company",
                    name.get_ref()
                ),
            ))
        }
    };
    let pipedrive = |table: SpannedMap| -> Result<Vec<FieldMapping>, ConfigError> {
        table
            .into_iter()
            .map(|(name, key)| {
                let field = key.get_ref().trim().to_ascii_lowercase();
                if !is_pipedrive_key(&field) {
                    return Err(ConfigError::new(
                        at(key.span()),
                        format!(
                            "'{}' is not a Pipedrive custom field key: keys are 40-character hashes, listed by GET /v1/personFields and /v1/dealFields",
                            key.get_ref()
                        ),
                    ));
                }
                Ok(FieldMapping {
                    attribute: attribute(&name)?,
                    field,
                })
            })
            .collect()
    };
    let mut mappings = Mappings {
        pipedrive_person: pipedrive(raw.pipedrive.person)?,
        pipedrive_deal: pipedrive(raw.pipedrive.deal)?,
        ..Mappings::default()
    };
    for (name, parameter) in raw.salesman {
        let field = parameter.get_ref().trim().to_ascii_lowercase();
        if SALESMAN_OWN.contains(&field.as_str()) {
            return Err(ConfigError::new(
                at(parameter.span()),
                format!(
                    "SalesMan's '{field}' is filled by LeadRelay from the lead itself; map to one of {}",
                    SALESMAN_PARAMETERS.join(", ")
                ),
            ));
        }
        if !SALESMAN_PARAMETERS.contains(&field.as_str()) {
            return Err(ConfigError::new(
                at(parameter.span()),
                format!(
                    "'{}' is not a SalesMan lead parameter: use one of {}",
                    parameter.get_ref(),
                    SALESMAN_PARAMETERS.join(", ")
                ),
            ));
        }
        mappings.salesman.push(FieldMapping {
            attribute: attribute(&name)?,
            field,
        });
    }
    for (what, target) in raw.hana {
        let name = target.get_ref().trim();
        if !name.is_empty() && !is_attribute_name(name) {
            return Err(ConfigError::new(
                at(target.span()),
                format!("'{name}' is not a Hana attribute name (\"\" writes nothing)"),
            ));
        }
        let slot = mappings.hana.slot(what.get_ref().trim()).ok_or_else(|| {
            ConfigError::new(
                at(what.span()),
                format!(
                    "LeadRelay writes nothing called '{}' back to Hana: use pipedrive_person_id, salesman_lead_id, sales_status, pipedrive_deal_id, deal_status, lost_reason or stage_id",
                    what.get_ref()
                ),
            )
        })?;
        name.clone_into(slot);
    }
    Ok(mappings)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(text: &str) -> Result<Mappings, ConfigError> {
        parse(Path::new("leadrelay.toml"), text)
    }

    #[test]
    fn every_table_is_read_and_the_rest_keeps_its_default() -> Result<(), ConfigError> {
        let mappings = parsed(
            r#"
[mappings.pipedrive.person]
cf_string_cong_ty = "9DC80C50D78A15643BFC4CA79D76156A73A1CA0E"

[mappings.pipedrive.deal]
cf_number_ngan_sach = "1f6a09f3b8c2d4e5a6b7c8d9e0f1a2b3c4d5e6f7"

[mappings.salesman]
cf_string_cong_ty = "company"
cf_string_thanh_pho = "City"

[mappings.hana]
pipedrive_person_id = "cf_string_pd"
sales_status = ""
"#,
        )?;
        assert_eq!(
            mappings.pipedrive_person,
            vec![FieldMapping {
                attribute: "cf_string_cong_ty".to_owned(),
                field: "9dc80c50d78a15643bfc4ca79d76156a73a1ca0e".to_owned(),
            }]
        );
        assert_eq!(mappings.pipedrive_deal.len(), 1);
        assert_eq!(
            mappings
                .salesman
                .iter()
                .map(|mapping| mapping.field.as_str())
                .collect::<Vec<_>>(),
            vec!["company", "city"]
        );
        assert_eq!(mappings.hana.pipedrive_person_id, "cf_string_pd");
        assert_eq!(mappings.hana.sales_status, "");
        assert_eq!(
            mappings.hana.salesman_lead_id,
            HanaWriteBack::default().salesman_lead_id
        );
        Ok(())
    }

    #[test]
    fn no_mappings_are_the_defaults() -> Result<(), ConfigError> {
        assert_eq!(parsed("")?, Mappings::default());
        Ok(())
    }

    #[test]
    fn mistakes_name_the_line_and_the_way_out() {
        let cases = [
            (
                "[mappings.pipedrive.person]\ncf_string_a = \"abc\"\n",
                "line 2",
                "40-character",
            ),
            (
                "[mappings.salesman]\n\ncf_string_a = \"email\"\n",
                "line 3",
                "filled by LeadRelay",
            ),
            (
                "[mappings.salesman]\ncf_string_a = \"fax\"\n",
                "line 2",
                "company, ip",
            ),
            (
                "[mappings.hana]\nwhatever = \"cf_string_x\"\n",
                "line 2",
                "pipedrive_person_id",
            ),
            (
                "[mappings.pipedrive.lead]\nx = \"y\"\n",
                "line 1",
                "unknown field",
            ),
            (
                "[mappings.salesman]\n\"bad name\" = \"city\"\n",
                "line 2",
                "not a Hana attribute",
            ),
        ];
        for (text, line, reason) in cases {
            let error = parsed(text).err().map(|error| error.to_string());
            assert!(
                error
                    .as_deref()
                    .is_some_and(|error| error.contains(line) && error.contains(reason)),
                "{text}: {error:?}"
            );
        }
    }
}
