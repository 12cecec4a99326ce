//! Deadlines that assume native speed, scaled for slower machines: `cargo xtask vm` sets
//! [`SCALE_VAR`] for guests under emulation, where everything runs 10-20x slower.

use std::time::Duration;

/// How many times slower than the host this machine is taken to be (default 1).
pub const SCALE_VAR: &str = "SIMNODE_TIME_SCALE";

/// Read once: podapp asks for every connection it serves.
pub fn scale() -> u32 {
    static SCALE: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *SCALE.get_or_init(|| {
        std::env::var(SCALE_VAR)
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|s| *s >= 1)
            .unwrap_or(1)
    })
}

/// `d` stretched by [`scale`].
pub fn scaled(d: Duration) -> Duration {
    d * scale()
}
