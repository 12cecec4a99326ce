//! A simulated Kubernetes node on this machine, for the privileged tests, the demo and the
//! benchmarks.
//!
//! A [`Node`] is a Linux bridge plus a cgroup v2 directory; each [`Pod`] on it is a network
//! namespace with a veth into the bridge, an IPv4 and an IPv6 address, and its own cgroup v2
//! directory. Processes are placed in a pod's cgroup *and* netns ([`Pod::command`]);
//! closures can run on a thread inside a pod's netns ([`Pod::in_netns`]). Everything is
//! torn down by `Drop`, also when a test panics, and every name carries a per-run id, so a
//! crashed run never breaks the next one.

pub mod agent;
pub mod app;
pub mod attempt;
pub mod capture;
pub mod cni;
// The container-runtime harness needs protoc to build (k8s-cri); xtask leaves it out, so
// `cargo xtask setup` builds on a machine that has no protoc yet.
#[cfg(feature = "cri")]
pub mod cri;
pub mod http_app;
pub mod image;
pub mod jwt;
mod node;
pub mod pki;
pub mod proto;
pub mod spire;
mod sys;
pub mod time;

pub use agent::{workspace_bin, Agent, AgentConfig, CliOutput, Enrol};
pub use app::{client_result, Server};
pub use node::{command_in, sweep_stale, Node, Pod};
pub use sys::{attached_programs, cgroup2_root, netns_links, netns_links_by_ino, require_root};
