//! The agent as a library: the daemon's modules, used by the `agent` binary (daemon and CLI)
//! and by benchmarks.

pub mod admin;
pub mod authz;
pub mod ca;
pub mod cgroup;
pub mod config;
pub mod ebpf;
pub mod identity;
pub mod metrics;
pub mod netns;
pub mod proxy;
pub mod run;
pub mod telemetry;
pub mod tls;
pub mod watch;
