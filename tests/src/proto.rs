//! The tiny protocol spoken by `podapp` (the test application) and read by the tests.
//!
//! A client sends `SEND <n> REPLY <m> SEED <s>\n`, then `n` pattern bytes, then half-closes
//! its side. The server reads the `n` bytes, then answers with one line
//! `OK peer=<addr> local=<addr> got=<n> sha=<hex>\n` followed by `m` pattern bytes, and
//! closes. So every exchange checks the bytes both ways and exercises half-close.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Deterministic bytes from a seed (xorshift64*), cheap enough for 64 MiB transfers.
pub struct Pattern(u64);

impl Pattern {
    pub fn new(seed: u64) -> Self {
        Pattern(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let mut x = self.0;
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            self.0 = x;
            let v = x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }

    /// The SHA-256 of the first `len` bytes of this seed's pattern.
    pub fn sha(seed: u64, len: u64) -> String {
        let mut p = Pattern::new(seed);
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 64 * 1024];
        let mut left = len;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            // Chunk sizes are multiples of 8 except the last, so the stream is identical
            // however a reader or writer slices it.
            p.fill(&mut buf[..n]);
            h.update(&buf[..n]);
            left -= n as u64;
        }
        hex(&h.finalize())
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn request_line(send: u64, reply: u64, seed: u64) -> String {
    format!("SEND {send} REPLY {reply} SEED {seed}\n")
}

/// Parses a request line into (send, reply, seed).
pub fn parse_request(line: &str) -> Option<(u64, u64, u64)> {
    let f: Vec<&str> = line.split_whitespace().collect();
    match f.as_slice() {
        ["SEND", n, "REPLY", m, "SEED", s] => {
            Some((n.parse().ok()?, m.parse().ok()?, s.parse().ok()?))
        }
        _ => None,
    }
}

/// What the server said about a connection.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ServerView {
    pub peer: String,
    pub local: String,
    pub got: u64,
    pub sha: String,
}

pub fn response_line(v: &ServerView) -> String {
    format!(
        "OK peer={} local={} got={} sha={}\n",
        v.peer, v.local, v.got, v.sha
    )
}

pub fn parse_response(line: &str) -> Option<ServerView> {
    let rest = line.trim_end().strip_prefix("OK ")?;
    let mut v = ServerView::default();
    for kv in rest.split(' ') {
        let (k, val) = kv.split_once('=')?;
        match k {
            "peer" => v.peer = val.to_string(),
            "local" => v.local = val.to_string(),
            "got" => v.got = val.parse().ok()?,
            "sha" => v.sha = val.to_string(),
            _ => return None,
        }
    }
    Some(v)
}

/// One connection as the client saw it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ConnResult {
    /// The address the client dialed.
    pub to: String,
    /// The client socket's own address (getsockname): loopback when redirected.
    pub local: String,
    pub server: Option<ServerView>,
    /// The server received exactly the bytes sent.
    pub sent_ok: bool,
    /// The client received exactly the bytes the server generated.
    pub reply_ok: bool,
    pub error: Option<String>,
}

impl ConnResult {
    pub fn ok(&self) -> bool {
        self.error.is_none() && self.sent_ok && self.reply_ok
    }
}

/// The client's report, printed as one JSON line.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Summary {
    pub ok: u64,
    pub failed: u64,
    pub errors: Vec<String>,
    pub results: Vec<ConnResult>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_is_slice_independent() {
        let mut a = vec![0u8; 100];
        Pattern::new(7).fill(&mut a);
        let mut b = vec![0u8; 100];
        let mut p = Pattern::new(7);
        p.fill(&mut b[..64]);
        p.fill(&mut b[64..]);
        assert_eq!(a, b);
        assert_eq!(Pattern::sha(7, 100), hex(&Sha256::digest(&a)));
    }

    #[test]
    fn lines_roundtrip() {
        assert_eq!(parse_request(&request_line(1, 2, 3)), Some((1, 2, 3)));
        let v = ServerView {
            peer: "10.0.0.1:5".into(),
            local: "[fd00::2]:80".into(),
            got: 9,
            sha: "ab".into(),
        };
        assert_eq!(parse_response(&response_line(&v)), Some(v));
    }
}
