//! The one place the rustls crypto provider is built (ring), shared by identity loading
//! and the TLS configurations.

use std::sync::{Arc, OnceLock};

use rustls::crypto::CryptoProvider;

/// ring, built once.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}
