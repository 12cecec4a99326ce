//! A verified token's claims, as rules and the access log read them.

use std::collections::BTreeMap;

use serde_json::Value;

/// The claims of a token whose signature, issuer, audience and times were verified.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Claims {
    pub issuer: String,
    /// `sub`, empty when the token has none.
    pub subject: String,
    /// Every claim, by name.
    pub all: BTreeMap<String, Value>,
}

impl Claims {
    /// Whether claim `name` holds `want`: equal to a string claim, or to any string of an
    /// array claim (`groups`, `roles`); numbers and booleans compare as their JSON text.
    pub fn has(&self, name: &str, want: &str) -> bool {
        let scalar = |v: &Value| match v {
            Value::String(s) => s == want,
            Value::Number(n) => n.to_string() == want,
            Value::Bool(b) => b.to_string() == want,
            _ => false,
        };
        match self.all.get(name) {
            Some(Value::Array(items)) => items.iter().any(scalar),
            Some(v) => scalar(v),
            None => false,
        }
    }
}
