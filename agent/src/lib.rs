//! The agent as a library: the daemon's modules, used by the `agent` binary (daemon and CLI)
//! and by benchmarks.
//!
//! Layers point one way (see docs/architecture.md): `types` at the bottom; then the
//! system seams (`cgroup`, `netns`), `crypto`, `store`, `pump` and `ratelimit`; `identity` → `tls`;
//! `authz`; `ebpf`; `spec` (and `state`); `telemetry`; `proxy`; `admin`; and at the top
//! `config` and `run`, the only code that reads the configuration. `privilege` stands alone
//! (the binary calls it once, before the runtime starts).

// The accept and handshake paths never queue on one std lock (see clippy.toml).
#![deny(clippy::disallowed_types)]

pub mod admin;
pub mod authn;
pub mod authz;
pub mod ca;
pub mod cgroup;
pub mod cni;
pub mod config;
pub mod crypto;
pub mod ebpf;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod identity;
pub mod k8s;
pub mod netns;
pub mod pem;
pub mod privilege;
pub mod proxy;
pub mod pump;
pub mod ratelimit;
pub mod run;
pub mod spec;
pub mod state;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod types;
