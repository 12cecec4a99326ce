//! What a verified peer certificate says, read once after the handshake: the facts rules
//! match on, the access log records and `x-forwarded-client-cert` passes to the app.

use sha2::{Digest, Sha256};
use x509_parser::extensions::GeneralName;

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CertFacts {
    /// SHA-256 of the DER certificate, lower-case hex (XFCC's `Hash`).
    pub hash: String,
    /// The subject as x509-parser prints it, in certificate order: `CN=alice, O=Partner`.
    pub subject: String,
    pub uris: Vec<String>,
    pub dns: Vec<String>,
    pub emails: Vec<String>,
    pub serial: String,
}

impl CertFacts {
    /// The facts of a DER certificate (`None` if it does not parse: the handshake already
    /// verified it, so that does not happen for a peer's leaf).
    pub fn of(der: &[u8]) -> Option<Self> {
        let (_, x) = x509_parser::parse_x509_certificate(der).ok()?;
        let mut facts = CertFacts {
            hash: hex(&Sha256::digest(der)),
            subject: x.subject().to_string(),
            serial: super::serial_of(der),
            ..Default::default()
        };
        if let Ok(Some(san)) = x.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    GeneralName::URI(u) => facts.uris.push(u.to_string()),
                    GeneralName::DNSName(d) => facts.dns.push(d.to_string()),
                    GeneralName::RFC822Name(e) => facts.emails.push(e.to_string()),
                    _ => {}
                }
            }
        }
        Some(facts)
    }

    /// Every subject alternative name, whatever its kind.
    pub fn sans(&self) -> impl Iterator<Item = &str> {
        self.uris
            .iter()
            .chain(&self.dns)
            .chain(&self.emails)
            .map(String::as_str)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
