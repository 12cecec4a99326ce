//! Peer chains already verified against the current trust bundle.
//!
//! A full verification costs an ECDSA signature check per certificate in the peer's chain,
//! on top of the handshake's own CertificateVerify. Between two workloads that reconnect
//! all the time, the chain is the same every time, so its verdict is kept (keyed by a hash
//! of the chain and the key usage) for as long as every certificate in it stays valid. The
//! CertificateVerify signature, which proves the peer holds the key, is never cached.
//!
//! The cache lives inside one loaded identity (it belongs to that trust bundle): a rotation
//! or a new bundle starts with an empty one.

use dashmap::DashMap;
use rustls::pki_types::CertificateDer;
use sha2::{Digest, Sha256};

use super::SpiffeId;

/// Bounded: when full it is emptied (a burst of new peers costs one full check each).
const MAX_ENTRIES: usize = 4096;

pub type Key = [u8; 32];

#[derive(Debug, Clone)]
struct Entry {
    peer: SpiffeId,
    /// The window in which every certificate of the chain is valid (Unix seconds).
    not_before: i64,
    not_after: i64,
}

#[derive(Debug, Default)]
pub struct ChainCache {
    /// Sharded, so concurrent handshakes do not queue on one lock.
    entries: DashMap<Key, Entry>,
}

/// The key of a chain presented for a usage (client or server authentication).
pub fn key(usage: u8, end_entity: &[u8], intermediates: &[CertificateDer<'_>]) -> Key {
    let mut h = Sha256::new();
    h.update([usage]);
    for cert in std::iter::once(end_entity).chain(intermediates.iter().map(|c| c.as_ref())) {
        // Length-prefixed, so two different chains can never hash the same bytes.
        h.update((cert.len() as u64).to_be_bytes());
        h.update(cert);
    }
    h.finalize().into()
}

impl ChainCache {
    /// The peer's identity if this chain was verified and is still inside its window.
    pub fn get(&self, key: &Key, now: i64) -> Option<SpiffeId> {
        let e = self.entries.get(key)?;
        (e.not_before <= now && now < e.not_after).then(|| e.peer.clone())
    }

    /// Remembers a chain that just passed full verification. A chain whose validity cannot
    /// be read is simply not cached.
    pub fn insert(
        &self,
        key: Key,
        peer: SpiffeId,
        end_entity: &[u8],
        intermediates: &[CertificateDer<'_>],
    ) {
        let Some((not_before, not_after)) = window(end_entity, intermediates) else {
            return;
        };
        if self.entries.len() >= MAX_ENTRIES {
            self.entries.clear();
        }
        self.entries.insert(
            key,
            Entry {
                peer,
                not_before,
                not_after,
            },
        );
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.len()
    }
}

/// The latest notBefore and earliest notAfter over the chain.
fn window(end_entity: &[u8], intermediates: &[CertificateDer<'_>]) -> Option<(i64, i64)> {
    let mut w = (i64::MIN, i64::MAX);
    for cert in std::iter::once(end_entity).chain(intermediates.iter().map(|c| c.as_ref())) {
        let (_, x) = x509_parser::parse_x509_certificate(cert).ok()?;
        let v = x.validity();
        w.0 = w.0.max(v.not_before.timestamp());
        w.1 = w.1.min(v.not_after.timestamp());
    }
    Some(w)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(not_before: i64, not_after: i64) -> Vec<u8> {
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.not_before =
            rcgen::date_time_ymd(1970, 1, 1) + std::time::Duration::from_secs(not_before as u64);
        p.not_after =
            rcgen::date_time_ymd(1970, 1, 1) + std::time::Duration::from_secs(not_after as u64);
        let key = rcgen::KeyPair::generate().unwrap();
        p.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn a_verdict_holds_only_inside_the_chain_window() {
        let cache = ChainCache::default();
        let ee = cert(1_000_000, 2_000_000);
        let inter = CertificateDer::from(cert(1_500_000, 3_000_000));
        let k = key(1, &ee, std::slice::from_ref(&inter));
        let peer = SpiffeId::parse("spiffe://td/ns/a").unwrap();
        cache.insert(k, peer.clone(), &ee, std::slice::from_ref(&inter));
        assert_eq!(cache.get(&k, 1_600_000), Some(peer));
        // Before the intermediate is valid, and once the end entity has expired.
        assert_eq!(cache.get(&k, 1_200_000), None);
        assert_eq!(cache.get(&k, 2_000_000), None);
    }

    #[test]
    fn usage_and_chain_are_part_of_the_key() {
        let ee = cert(0, 10);
        let other = cert(0, 10);
        assert_ne!(key(1, &ee, &[]), key(2, &ee, &[]));
        assert_ne!(key(1, &ee, &[]), key(1, &other, &[]));
        assert_ne!(
            key(1, &ee, &[]),
            key(1, &ee, &[CertificateDer::from(other.clone())])
        );
    }

    #[test]
    fn bounded() {
        let cache = ChainCache::default();
        let ee = cert(0, i64::from(u32::MAX));
        let peer = SpiffeId::parse("spiffe://td/x").unwrap();
        for i in 0..MAX_ENTRIES + 1 {
            let mut k = [0u8; 32];
            k[..8].copy_from_slice(&(i as u64).to_be_bytes());
            cache.insert(k, peer.clone(), &ee, &[]);
        }
        assert!(cache.len() <= MAX_ENTRIES);
    }
}
