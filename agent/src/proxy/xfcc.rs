//! `x-forwarded-client-cert`, in Envoy's format, so an application behind the agent learns
//! who called it from a header it can trust: the agent removes whatever a client sent
//! under that name and sets its own from the certificate the handshake verified
//! (Envoy's `SANITIZE_SET`).
//!
//! `By=<the pod's SPIFFE ID>;Hash=<sha256 of the peer's DER certificate>;Subject="...";
//! URI=...;DNS=...`: keys in that order, a value quoted when it holds `,`, `;`, `=` or
//! `"` (and the subject always, as Envoy does), a quote inside escaped with a backslash.

use crate::identity::{CertFacts, SpiffeId};

pub const HEADER: &str = "x-forwarded-client-cert";

/// The header value for a caller that presented `cert` to a pod known as `by`.
pub fn value(by: Option<&SpiffeId>, cert: &CertFacts) -> String {
    let mut parts: Vec<String> = Vec::new();
    if let Some(by) = by {
        parts.push(format!("By={}", quoted_if_needed(by.as_str())));
    }
    parts.push(format!("Hash={}", cert.hash));
    parts.push(format!("Subject={}", quoted(&cert.subject)));
    for uri in &cert.uris {
        parts.push(format!("URI={}", quoted_if_needed(uri)));
    }
    for dns in &cert.dns {
        parts.push(format!("DNS={}", quoted_if_needed(dns)));
    }
    parts.join(";")
}

fn quoted(v: &str) -> String {
    format!("\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\""))
}

fn quoted_if_needed(v: &str) -> String {
    if v.contains([',', ';', '=', '"']) {
        quoted(v)
    } else {
        v.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envoy_format_with_quoting() {
        let cert = CertFacts {
            hash: "ab12".into(),
            subject: "CN=alice, O=Partner \"EU\"".into(),
            uris: vec!["spiffe://td/ns/a/sa/web".into()],
            dns: vec!["alice.example.com".into()],
            ..Default::default()
        };
        let by = SpiffeId::parse("spiffe://td/ns/b/sa/api").unwrap();
        assert_eq!(
            value(Some(&by), &cert),
            "By=spiffe://td/ns/b/sa/api;Hash=ab12;Subject=\"CN=alice, O=Partner \\\"EU\\\"\";\
             URI=spiffe://td/ns/a/sa/web;DNS=alice.example.com"
        );
        let plain = CertFacts {
            hash: "00".into(),
            ..Default::default()
        };
        assert_eq!(value(None, &plain), "Hash=00;Subject=\"\"");
    }
}
