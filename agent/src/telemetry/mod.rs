//! What the agent tells operators: logs (human or JSON), the access record of every
//! connection, Prometheus metrics and the registry of live connections. Everything here
//! reads the typed facts the proxy hands it; nothing is parsed back out of a record.

pub mod access;
mod log;
pub mod metrics;

pub use log::{init, kernel_log_level, set_format, set_level};
