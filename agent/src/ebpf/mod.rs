//! Everything the agent does with the kernel's BPF subsystem: loading the embedded object,
//! typed access to its maps, and attaching programs to pod cgroups with RAII links.

pub mod dump;
mod links;
mod loader;
mod maps;
pub mod probe;

pub use links::{
    attach_splice_track, pin_dir, pinned_pods, pins_are_stale, uninstall, Attach, PodLinks,
};
pub use loader::{Kernel, INBOUND_PROGRAM, REDIRECT_PROGRAMS, SPLICE_PROGRAMS};
pub use maps::{addr16, ip_from16, Counters, OrigDstTable, PodEntry};

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    #[error("loading the eBPF object failed: {0} (is the agent root, with CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN?)")]
    Load(#[source] aya::EbpfError),
    #[error("the eBPF object has no {kind} `{name}`: the agent binary is broken, rebuild it")]
    Missing {
        kind: &'static str,
        name: &'static str,
    },
    #[error("eBPF program `{name}`: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("BPF map `{name}`: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("BPF link: {0}")]
    Link(#[from] aya::programs::links::LinkError),
    #[error("cannot pin a BPF link at {path}: {source} (is {path} on bpffs?)")]
    Pin {
        path: PathBuf,
        #[source]
        source: aya::pin::PinError,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Bpffs(String),
    #[error("cannot route eBPF logs: {0}")]
    Logger(String),
}

fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> EbpfError {
    let path = path.into();
    move |source| EbpfError::Io { path, source }
}
