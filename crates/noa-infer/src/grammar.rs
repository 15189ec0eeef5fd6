//! Constrained output: GBNF grammars for JSON, and a converter from JSON Schema to GBNF.
//!
//! llama.cpp samples only tokens its grammar allows, so the output is valid by construction. The converter
//! covers the schema subset structured-output APIs use: `type` (object, array, string, number, integer, boolean,
//! null, or a list of them), `properties` (emitted in order; all of them), `items`, `enum`, `const`, `anyOf`/`oneOf`.
//! Anything else is an error that names the schema path, never a silently looser grammar.

use serde_json::Value;

/// Any JSON value (from llama.cpp's `json.gbnf`), with `root` an object.
pub const JSON_OBJECT: &str = r#"root   ::= object
value  ::= object | array | string | number | ("true" | "false" | "null") ws
object ::= "{" ws ( string ":" ws value ("," ws string ":" ws value)* )? "}" ws
array  ::= "[" ws ( value ("," ws value)* )? "]" ws
string ::= "\"" ( [^"\\\x7F\x00-\x1F] | "\\" (["\\bfnrt] | "u" [0-9a-fA-F]{4}) )* "\"" ws
number ::= ("-"? ([0-9] | [1-9] [0-9]{0,15})) ("." [0-9]+)? ([eE] [-+]? [0-9] [1-9]{0,15})? ws
ws     ::= | " " | "\n" [ \t]{0,20}
"#;

const PRIMITIVES: &str = r#"string  ::= "\"" ( [^"\\\x7F\x00-\x1F] | "\\" (["\\bfnrt] | "u" [0-9a-fA-F]{4}) )* "\"" ws
number  ::= ("-"? ([0-9] | [1-9] [0-9]{0,15})) ("." [0-9]+)? ([eE] [-+]? [0-9] [1-9]{0,15})? ws
integer ::= ("-"? ([0-9] | [1-9] [0-9]{0,15})) ws
boolean ::= ("true" | "false") ws
null    ::= "null" ws
value   ::= object | array | string | number | boolean | null
object  ::= "{" ws ( string ":" ws value ("," ws string ":" ws value)* )? "}" ws
array   ::= "[" ws ( value ("," ws value)* )? "]" ws
ws      ::= | " " | "\n" [ \t]{0,20}
"#;

/// A GBNF string literal for `s` as a JSON string (so the model writes it with its quotes).
fn literal(s: &str) -> String {
    gbnf_literal(&serde_json::to_string(s).unwrap_or_default())
}

/// A GBNF literal matching exactly `text`.
fn gbnf_literal(text: &str) -> String {
    let mut out = String::from("\"");
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

struct Converter {
    rules: Vec<String>,
}

impl Converter {
    fn rule(&mut self, body: String) -> String {
        let name = format!("r{}", self.rules.len());
        self.rules.push(format!("{name} ::= {body}"));
        name
    }

    fn convert(&mut self, schema: &Value, path: &str) -> Result<String, String> {
        if schema == &Value::Bool(true) || schema.as_object().is_some_and(|o| o.is_empty()) {
            return Ok("value".into());
        }
        let obj = schema
            .as_object()
            .ok_or_else(|| format!("{path}: a schema must be an object"))?;
        if let Some(c) = obj.get("const") {
            return Ok(self.rule(format!("{} ws", gbnf_literal(&c.to_string()))));
        }
        if let Some(e) = obj.get("enum") {
            let alts: Vec<String> = e
                .as_array()
                .ok_or_else(|| format!("{path}.enum: must be an array"))?
                .iter()
                .map(|v| gbnf_literal(&v.to_string()))
                .collect();
            if alts.is_empty() {
                return Err(format!("{path}.enum: must not be empty"));
            }
            return Ok(self.rule(format!("({}) ws", alts.join(" | "))));
        }
        for key in ["anyOf", "oneOf"] {
            if let Some(list) = obj.get(key) {
                let alts = list
                    .as_array()
                    .ok_or_else(|| format!("{path}.{key}: must be an array"))?
                    .iter()
                    .enumerate()
                    .map(|(i, s)| self.convert(s, &format!("{path}.{key}[{i}]")))
                    .collect::<Result<Vec<_>, _>>()?;
                return Ok(self.rule(alts.join(" | ")));
            }
        }
        let types: Vec<&str> = match obj.get("type") {
            None => return Ok("value".into()),
            Some(Value::String(t)) => vec![t.as_str()],
            Some(Value::Array(ts)) => ts.iter().filter_map(Value::as_str).collect(),
            Some(_) => {
                return Err(format!(
                    "{path}.type: must be a string or a list of strings"
                ));
            }
        };
        let mut alts = Vec::new();
        for t in types {
            alts.push(match t {
                "string" | "number" | "integer" | "boolean" | "null" => t.to_owned(),
                "array" => match obj.get("items") {
                    None => "array".to_owned(),
                    Some(items) => {
                        let item = self.convert(items, &format!("{path}.items"))?;
                        self.rule(format!("\"[\" ws ( {item} (\",\" ws {item})* )? \"]\" ws"))
                    }
                },
                "object" => match obj.get("properties").and_then(Value::as_object) {
                    None => "object".to_owned(),
                    Some(props) if props.is_empty() => "object".to_owned(),
                    Some(props) => {
                        let mut parts = Vec::new();
                        for (k, v) in props {
                            let r = self.convert(v, &format!("{path}.properties.{k}"))?;
                            parts.push(format!("{} \":\" ws {r}", literal(k)));
                        }
                        self.rule(format!("\"{{\" ws {} \"}}\" ws", parts.join(" \",\" ws ")))
                    }
                },
                other => return Err(format!("{path}.type: unknown type {other:?}")),
            });
        }
        Ok(self.rule(alts.join(" | ")))
    }
}

/// A GBNF grammar whose `root` is exactly the JSON values `schema` describes.
pub fn from_json_schema(schema: &Value) -> Result<String, String> {
    let mut c = Converter { rules: Vec::new() };
    let root = c.convert(schema, "schema")?;
    let mut g = format!("root ::= ws {root}\n");
    for r in &c.rules {
        g.push_str(r);
        g.push('\n');
    }
    g.push_str(PRIMITIVES);
    Ok(g)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    #[test]
    fn schemas_become_rules() {
        let g = from_json_schema(&json!({
            "type": "object",
            "properties": { "name": { "type": "string" }, "age": { "type": "integer" },
                            "tags": { "type": "array", "items": { "enum": ["a", "b"] } } }
        }))
        .unwrap();
        assert!(g.starts_with("root ::= ws r"), "{g}");
        assert!(
            g.contains(r#""\"name\"" ":" ws r"#) && g.contains("::= string"),
            "{g}"
        );
        assert!(g.contains(r#"("\"a\"" | "\"b\"") ws"#), "{g}");
        let e = from_json_schema(&json!({"type": "object", "properties": {"x": {"type": "date"}}}))
            .unwrap_err();
        assert_eq!(e, "schema.properties.x.type: unknown type \"date\"");
        assert!(from_json_schema(&json!({"enum": []})).is_err());
    }

    proptest! {
        #[test]
        fn any_json_never_panics(s in "\\PC{0,60}") {
            if let Ok(v) = serde_json::from_str::<Value>(&s) {
                let _ = from_json_schema(&v);
            }
        }
    }
}
