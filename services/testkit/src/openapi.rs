//! Checks HTTP requests and answers against an official OpenAPI 3.0 document, so that a test fake
//! cannot drift from the real API: the operation must exist for the method and path, path and
//! query parameters must be declared and of their declared type, required ones present, and a
//! JSON body must satisfy the operation's schema, with no top-level field the schema does not
//! declare (Pipedrive v2 refuses unknown fields).
//!
//! OpenAPI 3.0 schemas are JSON Schema draft 4 plus `nullable`; each operation's schema is
//! inlined (`$ref`s replaced by their targets) and `nullable` turned into a `null` type before it
//! is compiled.

use std::{collections::HashMap, path::Path, sync::Mutex};

use serde_json::{Map, Value};

/// Refs deeper than this are left as "anything": the documents have no meaningful recursion.
const MAX_DEPTH: usize = 24;

/// One OpenAPI document, its operations reachable under `prefix` (e.g. `/api/v2`).
pub struct OpenApi {
    document: Value,
    prefix: String,
    validators: Mutex<HashMap<String, std::sync::Arc<jsonschema::Validator>>>,
}

impl std::fmt::Debug for OpenApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenApi")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

/// An operation found for a request.
struct Operation<'d> {
    template: String,
    path_item: &'d Value,
    operation: &'d Value,
    path_values: Vec<(String, String)>,
}

impl OpenApi {
    /// Loads the YAML document at `path`; requests are expected under `prefix`.
    pub fn load(path: &Path, prefix: &str) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|error| format!("cannot read {}: {error}", path.display()))?;
        Self::from_yaml(&text, prefix).map_err(|error| format!("{}: {error}", path.display()))
    }

    /// Parses a YAML document; requests are expected under `prefix`.
    pub fn from_yaml(text: &str, prefix: &str) -> Result<Self, String> {
        let document: Value =
            serde_yaml::from_str(text).map_err(|error| format!("cannot parse: {error}"))?;
        Ok(Self {
            document,
            prefix: prefix.trim_end_matches('/').to_owned(),
            validators: Mutex::new(HashMap::new()),
        })
    }

    /// Every way the request breaks the document; empty when it conforms.
    pub fn check_request(
        &self,
        method: &str,
        path: &str,
        query: &[(String, String)],
        body: Option<&[u8]>,
    ) -> Vec<String> {
        let label = format!("{method} {path}");
        let operation = match self.find(method, path) {
            Ok(operation) => operation,
            Err(problem) => return vec![format!("{label}: {problem}")],
        };
        let mut problems = Vec::new();
        let parameters = self.parameters(&operation);
        for (name, value) in &operation.path_values {
            match parameters.get(&("path", name.clone())) {
                Some(parameter) => {
                    problems.extend(self.check_parameter(parameter, name, value));
                }
                None => problems.push(format!("path parameter {name} is not declared")),
            }
        }
        for (name, value) in query {
            match parameters.get(&("query", name.clone())) {
                Some(parameter) => problems.extend(self.check_parameter(parameter, name, value)),
                None => problems.push(format!("query parameter {name} is not declared")),
            }
        }
        for ((location, name), parameter) in &parameters {
            let required = parameter.get("required").and_then(Value::as_bool) == Some(true);
            if *location == "query" && required && !query.iter().any(|(given, _)| given == name) {
                problems.push(format!("required query parameter {name} is missing"));
            }
        }
        let schema_pointer = "/requestBody/content/application~1json/schema";
        match (operation.operation.pointer(schema_pointer), body) {
            (Some(_), Some(bytes)) if !bytes.is_empty() => {
                match serde_json::from_slice::<Value>(bytes) {
                    Ok(json) => {
                        let key = format!("{method} {} request", operation.template);
                        problems.extend(self.check_schema(
                            &key,
                            operation.operation,
                            schema_pointer,
                            &json,
                        ));
                    }
                    Err(error) => problems.push(format!("the body is not JSON: {error}")),
                }
            }
            (None, Some(bytes)) if !bytes.is_empty() => {
                problems.push("the operation takes no JSON body".to_owned());
            }
            _ => {}
        }
        problems
            .into_iter()
            .map(|problem| format!("{label}: {problem}"))
            .collect()
    }

    /// Every way an answer breaks the document's response schema for `status`.
    pub fn check_response(
        &self,
        method: &str,
        path: &str,
        status: u16,
        body: &Value,
    ) -> Vec<String> {
        let label = format!("{method} {path} → {status}");
        let operation = match self.find(method, path) {
            Ok(operation) => operation,
            Err(problem) => return vec![format!("{label}: {problem}")],
        };
        let responses = operation.operation.get("responses");
        let code = status.to_string();
        let Some(response_key) = [code.as_str(), "default"]
            .into_iter()
            .find(|key| responses.and_then(|all| all.get(key)).is_some())
        else {
            return vec![format!("{label}: the document has no such response")];
        };
        let pointer = format!("/responses/{response_key}/content/application~1json/schema");
        if operation.operation.pointer(&pointer).is_none() {
            return Vec::new();
        }
        let key = format!("{method} {} {response_key}", operation.template);
        self.check_schema(&key, operation.operation, &pointer, body)
            .into_iter()
            .map(|problem| format!("{label}: {problem}"))
            .collect()
    }

    fn find(&self, method: &str, path: &str) -> Result<Operation<'_>, String> {
        let relative = path
            .strip_prefix(&self.prefix)
            .ok_or_else(|| format!("not under {}", self.prefix))?;
        let segments: Vec<&str> = relative.trim_matches('/').split('/').collect();
        let paths = self
            .document
            .get("paths")
            .and_then(Value::as_object)
            .ok_or("the document has no paths")?;
        // Literal segments beat parameters (`/persons/search` over `/persons/{id}`).
        /// A candidate: its literal segment count, template, path item and parameter values.
        type Candidate<'d> = (usize, &'d String, &'d Value, Vec<(String, String)>);
        let mut best: Option<Candidate<'_>> = None;
        for (template, item) in paths {
            let parts: Vec<&str> = template.trim_matches('/').split('/').collect();
            if parts.len() != segments.len() {
                continue;
            }
            let mut literal = 0;
            let mut values = Vec::new();
            let matched = parts.iter().zip(&segments).all(|(part, segment)| {
                if let Some(name) = part.strip_prefix('{').and_then(|p| p.strip_suffix('}')) {
                    values.push((name.to_owned(), (*segment).to_owned()));
                    true
                } else {
                    literal += 1;
                    part == segment
                }
            });
            if matched && best.as_ref().is_none_or(|(score, ..)| literal > *score) {
                best = Some((literal, template, item, values));
            }
        }
        let (_, template, item, path_values) =
            best.ok_or_else(|| "no such path in the document".to_owned())?;
        let operation = item
            .get(method.to_ascii_lowercase())
            .ok_or_else(|| format!("{template} has no {method} operation"))?;
        Ok(Operation {
            template: template.clone(),
            path_item: item,
            operation,
            path_values,
        })
    }

    /// Path-level and operation-level parameters by (location, name), `$ref`s resolved.
    fn parameters<'o>(
        &'o self,
        operation: &Operation<'o>,
    ) -> HashMap<(&'static str, String), &'o Value> {
        let mut found = HashMap::new();
        for list in [
            operation.path_item.get("parameters"),
            operation.operation.get("parameters"),
        ]
        .into_iter()
        .flatten()
        .filter_map(Value::as_array)
        {
            for parameter in list {
                let parameter = self.follow(parameter);
                let location = match parameter.get("in").and_then(Value::as_str) {
                    Some("path") => "path",
                    Some("query") => "query",
                    _ => continue,
                };
                if let Some(name) = parameter.get("name").and_then(Value::as_str) {
                    found.insert((location, name.to_owned()), parameter);
                }
            }
        }
        found
    }

    fn follow<'v>(&'v self, value: &'v Value) -> &'v Value {
        match value.get("$ref").and_then(Value::as_str) {
            Some(reference) => reference
                .strip_prefix('#')
                .and_then(|pointer| self.document.pointer(pointer))
                .unwrap_or(value),
            None => value,
        }
    }

    fn check_parameter(&self, parameter: &Value, name: &str, text: &str) -> Vec<String> {
        let Some(schema) = parameter.get("schema").map(|schema| self.follow(schema)) else {
            return Vec::new();
        };
        let kind = schema
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("string");
        let value = match kind {
            "integer" => match text.parse::<i64>() {
                Ok(number) => Value::from(number),
                Err(_) => return vec![format!("parameter {name}={text} is not an integer")],
            },
            "number" => match text.parse::<f64>() {
                Ok(number) => Value::from(number),
                Err(_) => return vec![format!("parameter {name}={text} is not a number")],
            },
            "boolean" => match text {
                "true" => Value::Bool(true),
                "false" => Value::Bool(false),
                _ => return vec![format!("parameter {name}={text} is not true or false")],
            },
            _ => Value::String(text.to_owned()),
        };
        let resolved = self.inline(schema, 0);
        match jsonschema::options()
            .with_draft(jsonschema::Draft::Draft4)
            .build(&resolved)
        {
            Ok(validator) => validator
                .iter_errors(&value)
                .map(|error| format!("parameter {name}={text}: {error}"))
                .collect(),
            Err(error) => vec![format!(
                "parameter {name}: its schema does not compile: {error}"
            )],
        }
    }

    fn check_schema(
        &self,
        key: &str,
        operation: &Value,
        pointer: &str,
        json: &Value,
    ) -> Vec<String> {
        let Some(schema) = operation.pointer(pointer) else {
            return Vec::new();
        };
        let validator = {
            let mut cache = self
                .validators
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            match cache.get(key) {
                Some(validator) => validator.clone(),
                None => {
                    let resolved = self.inline(schema, 0);
                    match jsonschema::options()
                        .with_draft(jsonschema::Draft::Draft4)
                        .build(&resolved)
                    {
                        Ok(validator) => {
                            let validator = std::sync::Arc::new(validator);
                            cache.insert(key.to_owned(), validator.clone());
                            validator
                        }
                        Err(error) => return vec![format!("the schema does not compile: {error}")],
                    }
                }
            }
        };
        let mut problems: Vec<String> = validator
            .iter_errors(json)
            .map(|error| format!("{} at '{}'", error, error.instance_path()))
            .collect();
        if key.ends_with(" request")
            && let Value::Object(fields) = json
        {
            let declared = self.declared_properties(schema, 0);
            if !declared.is_empty() {
                for name in fields.keys() {
                    if !declared.contains(name) {
                        problems.push(format!("field '{name}' is not in the schema"));
                    }
                }
            }
        }
        problems
    }

    /// Top-level property names a schema declares, through `$ref` and `allOf`.
    fn declared_properties(&self, schema: &Value, depth: usize) -> Vec<String> {
        if depth > MAX_DEPTH {
            return Vec::new();
        }
        let schema = self.follow(schema);
        let mut names: Vec<String> = schema
            .get("properties")
            .and_then(Value::as_object)
            .map(|properties| properties.keys().cloned().collect())
            .unwrap_or_default();
        if let Some(parts) = schema.get("allOf").and_then(Value::as_array) {
            for part in parts {
                names.extend(self.declared_properties(part, depth + 1));
            }
        }
        names
    }

    /// `schema` with every `$ref` replaced by its target and `nullable` made a `null` type.
    fn inline(&self, schema: &Value, depth: usize) -> Value {
        if depth > MAX_DEPTH {
            return Value::Object(Map::new());
        }
        match schema {
            Value::Object(fields) => {
                if fields.contains_key("$ref") {
                    let target = self.follow(schema);
                    if std::ptr::eq(target, schema) {
                        return Value::Object(Map::new());
                    }
                    return self.inline(target, depth + 1);
                }
                let mut out = Map::new();
                for (name, value) in fields {
                    let value = match name.as_str() {
                        // Maps of schemas, lists of schemas, and single schemas.
                        "properties" | "patternProperties" => match value {
                            Value::Object(children) => Value::Object(
                                children
                                    .iter()
                                    .map(|(key, child)| {
                                        (key.clone(), self.inline(child, depth + 1))
                                    })
                                    .collect(),
                            ),
                            other => other.clone(),
                        },
                        "allOf" | "anyOf" | "oneOf" => match value {
                            Value::Array(children) => Value::Array(
                                children
                                    .iter()
                                    .map(|child| self.inline(child, depth + 1))
                                    .collect(),
                            ),
                            other => other.clone(),
                        },
                        "items" | "not" | "additionalProperties" => match value {
                            Value::Object(_) => self.inline(value, depth + 1),
                            other => other.clone(),
                        },
                        // OpenAPI annotations JSON Schema does not know, or reads differently.
                        "nullable" | "example" | "examples" | "discriminator" | "readOnly"
                        | "writeOnly" | "deprecated" | "xml" | "externalDocs" => continue,
                        _ => value.clone(),
                    };
                    out.insert(name.clone(), value);
                }
                if fields.get("nullable").and_then(Value::as_bool) == Some(true) {
                    make_nullable(&mut out);
                }
                Value::Object(out)
            }
            other => other.clone(),
        }
    }
}

fn make_nullable(schema: &mut Map<String, Value>) {
    match schema.get_mut("type") {
        Some(Value::String(kind)) => {
            let kind = std::mem::take(kind);
            schema.insert("type".to_owned(), serde_json::json!([kind, "null"]));
        }
        Some(Value::Array(kinds)) if !kinds.iter().any(|kind| kind == "null") => {
            kinds.push(Value::from("null"));
        }
        _ => {}
    }
    if let Some(Value::Array(values)) = schema.get_mut("enum")
        && !values.iter().any(Value::is_null)
    {
        values.push(Value::Null);
    }
    for combinator in ["allOf", "oneOf", "anyOf"] {
        if let Some(parts) = schema.remove(combinator) {
            let mut wrapped = Map::new();
            wrapped.insert(combinator.to_owned(), parts);
            schema.insert(
                "anyOf".to_owned(),
                serde_json::json!([Value::Object(wrapped), {"type": "null"}]),
            );
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> OpenApi {
        let yaml = r"
openapi: 3.0.1
paths:
  /deals:
    post:
      requestBody:
        content:
          application/json:
            schema:
              $ref: '#/components/schemas/NewDeal'
      responses:
        '200':
          content:
            application/json:
              schema:
                type: object
                properties:
                  success: {type: boolean}
    get:
      parameters:
        - {in: query, name: limit, schema: {type: integer, maximum: 500}}
        - {in: query, name: sort_direction, schema: {type: string, enum: [asc, desc]}}
      responses: {}
  /deals/{id}:
    parameters:
      - {in: path, name: id, required: true, schema: {type: integer}}
    get:
      responses: {}
  /deals/search:
    get:
      parameters:
        - {in: query, name: term, required: true, schema: {type: string}}
      responses: {}
components:
  schemas:
    NewDeal:
      type: object
      required: [title]
      properties:
        title: {type: string}
        value: {type: number}
        person_id: {type: integer, nullable: true}
";
        OpenApi::from_yaml(yaml, "/api/v2").expect("a valid document")
    }

    #[test]
    fn a_conforming_request_has_no_problems() {
        let spec = spec();
        let body = br#"{"title":"T","value":1.5,"person_id":null}"#;
        assert_eq!(
            spec.check_request("POST", "/api/v2/deals", &[], Some(body)),
            Vec::<String>::new()
        );
        let query = [("limit".to_owned(), "500".to_owned())];
        assert!(
            spec.check_request("GET", "/api/v2/deals", &query, None)
                .is_empty()
        );
        assert!(
            spec.check_request("GET", "/api/v2/deals/7", &[], None)
                .is_empty()
        );
    }

    #[test]
    fn every_kind_of_drift_is_reported() {
        let spec = spec();
        let wrong_type = spec.check_request(
            "POST",
            "/api/v2/deals",
            &[],
            Some(br#"{"title":"T","value":"1.5"}"#),
        );
        assert_eq!(wrong_type.len(), 1, "{wrong_type:?}");
        let unknown = spec.check_request(
            "POST",
            "/api/v2/deals",
            &[],
            Some(br#"{"title":"T","api_token":"x"}"#),
        );
        assert!(
            unknown[0].contains("'api_token' is not in the schema"),
            "{unknown:?}"
        );
        let missing = spec.check_request("POST", "/api/v2/deals", &[], Some(b"{}"));
        assert_eq!(missing.len(), 1, "{missing:?}");
        let query = [
            ("limit".to_owned(), "501".to_owned()),
            ("api_token".to_owned(), "x".to_owned()),
        ];
        assert_eq!(
            spec.check_request("GET", "/api/v2/deals", &query, None)
                .len(),
            2
        );
        assert_eq!(
            spec.check_request("GET", "/api/v2/deals/abc", &[], None)
                .len(),
            1
        );
        assert_eq!(
            spec.check_request("GET", "/api/v2/deals/search", &[], None)
                .len(),
            1
        );
        assert_eq!(
            spec.check_request("DELETE", "/api/v2/deals", &[], None)
                .len(),
            1
        );
        assert_eq!(
            spec.check_request("GET", "/api/v2/nothing", &[], None)
                .len(),
            1
        );
        assert_eq!(
            spec.check_response(
                "POST",
                "/api/v2/deals",
                200,
                &serde_json::json!({"success": "yes"})
            )
            .len(),
            1
        );
    }
}
