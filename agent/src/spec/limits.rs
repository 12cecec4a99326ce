//! `[pod.limits]`: what one caller may ask of the pod (connections and requests per
//! second, connections at once) and how large one request may be.

use serde::{Deserialize, Serialize};

use super::SpecError;
use crate::ratelimit::{KeyClass, LimitSpec, Rate, DEFAULT_MAX_KEYS};

/// A `[pod.limits]` table as written.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsRequest {
    /// What the limits count separately (default: the client's address).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<KeyClass>,
    /// New inbound connections per second per key, and how many at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connections_per_second: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_burst: Option<u32>,
    /// Inbound connections one key may hold open.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrent: Option<u32>,
    /// HTTP requests per second per key, and how many at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_per_second: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_burst: Option<u32>,
    /// The HTTP ports whose every request the limits apply to (the agent inspects them);
    /// without it, the requests the agent inspects anyway (HTTP rules, edge, authn).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<u16>,
    /// More header fields than this is a 431.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_request_headers: Option<usize>,
    /// A request body longer than this is a 413.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_request_bytes: Option<u64>,
    /// Keys remembered per limit (the least recently seen are forgotten first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_keys: Option<usize>,
}

// Pod requests are compared whole (a re-enrolment that changes nothing is a no-op); a NaN
// rate, the one value not equal to itself, is refused by validation before it serves.
impl Eq for LimitsRequest {}

/// A validated `[pod.limits]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LimitsSpec {
    pub connections: Option<LimitSpec>,
    pub requests: Option<LimitSpec>,
    pub ports: Vec<u16>,
    pub max_request_headers: Option<usize>,
    pub max_request_bytes: Option<u64>,
}

impl LimitsRequest {
    pub(super) fn validate(
        &self,
        invalid: &dyn Fn(&str, String) -> SpecError,
    ) -> Result<LimitsSpec, SpecError> {
        let key = self.key.unwrap_or(KeyClass::SourceIp);
        let max_keys = self.max_keys.unwrap_or(DEFAULT_MAX_KEYS);
        if max_keys == 0 {
            return Err(invalid("max_keys", "0 remembers no caller".into()));
        }
        let rate =
            |field: &str, per_second: Option<f64>, burst: Option<u32>, burst_field: &str| match (
                per_second, burst,
            ) {
                (Some(r), burst) => Rate::new(r, burst).map(Some).map_err(|e| invalid(field, e)),
                (None, Some(_)) => Err(invalid(burst_field, format!("needs {field}"))),
                (None, None) => Ok(None),
            };
        let connection_rate = rate(
            "connections_per_second",
            self.connections_per_second,
            self.connection_burst,
            "connection_burst",
        )?;
        let request_rate = rate(
            "requests_per_second",
            self.requests_per_second,
            self.request_burst,
            "request_burst",
        )?;
        if self.concurrent == Some(0) {
            return Err(invalid(
                "concurrent",
                "0 would refuse every connection".into(),
            ));
        }
        let connections =
            (connection_rate.is_some() || self.concurrent.is_some()).then_some(LimitSpec {
                key,
                rate: connection_rate,
                concurrent: self.concurrent,
                max_keys,
            });
        if connections.is_some() && key == KeyClass::JwtSub {
            return Err(invalid(
                "key",
                "jwt_sub counts requests: a connection carries no token (limit connections by identity or source_ip)".into(),
            ));
        }
        if let Some(j) = self.ports.iter().position(|p| *p == 0) {
            return Err(invalid(
                &format!("ports[{j}]"),
                "port 0 is not a port".into(),
            ));
        }
        if self.max_request_headers == Some(0) {
            return Err(invalid(
                "max_request_headers",
                "0 refuses every request (each carries at least Host)".into(),
            ));
        }
        let per_request = request_rate.is_some()
            || self.max_request_headers.is_some()
            || self.max_request_bytes.is_some();
        if !self.ports.is_empty() && !per_request {
            return Err(invalid(
                "ports",
                "they name where requests are limited: give requests_per_second, max_request_headers or max_request_bytes".into(),
            ));
        }
        let mut ports = self.ports.clone();
        ports.sort_unstable();
        ports.dedup();
        Ok(LimitsSpec {
            connections,
            requests: request_rate.map(|rate| LimitSpec {
                key,
                rate: Some(rate),
                concurrent: None,
                max_keys,
            }),
            ports,
            max_request_headers: self.max_request_headers,
            max_request_bytes: self.max_request_bytes,
        })
    }
}

impl LimitsSpec {
    /// Whether every request on `port` must be inspected for these limits.
    pub fn forces_inspection(&self, port: u16) -> bool {
        self.ports.binary_search(&port).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(r: &LimitsRequest) -> Result<LimitsSpec, String> {
        r.validate(&|field, reason| SpecError {
            field: field.into(),
            reason,
        })
        .map_err(|e| e.field)
    }

    #[test]
    fn limits_name_the_field_that_is_wrong() {
        let mut r = LimitsRequest {
            connections_per_second: Some(0.0),
            ..Default::default()
        };
        assert_eq!(check(&r).unwrap_err(), "connections_per_second");
        r.connections_per_second = None;
        r.connection_burst = Some(3);
        assert_eq!(check(&r).unwrap_err(), "connection_burst");
        r.connection_burst = None;
        r.concurrent = Some(4);
        r.key = Some(KeyClass::JwtSub);
        assert_eq!(check(&r).unwrap_err(), "key");
        r.key = None;
        r.ports = vec![8080];
        assert_eq!(check(&r).unwrap_err(), "ports");
        r.max_request_headers = Some(0);
        assert_eq!(check(&r).unwrap_err(), "max_request_headers");
    }

    #[test]
    fn a_valid_table_gives_one_limit_per_kind() {
        let r = LimitsRequest {
            concurrent: Some(5),
            requests_per_second: Some(20.0),
            ports: vec![8080, 8080],
            max_request_bytes: Some(1024),
            ..Default::default()
        };
        let s = check(&r).unwrap();
        let c = s.connections.unwrap();
        assert_eq!(
            (c.key, c.rate, c.concurrent),
            (KeyClass::SourceIp, None, Some(5))
        );
        let q = s.requests.unwrap();
        assert_eq!(q.rate.unwrap().burst, 20);
        assert_eq!(s.ports, [8080]);
        assert!(s.forces_inspection(8080) && !s.forces_inspection(9090));
    }
}
