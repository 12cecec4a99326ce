//! Loads the eBPF object embedded at build time and routes its aya-log output into tracing.

use agent_common::{
    MAP_AGENT_CGROUPS, MAP_CONNECT_ORIG, MAP_COUNTERS, MAP_EXCLUDED_CIDRS, MAP_EXCLUDED_PORTS,
    MAP_INBOUND_EXCLUDED_PORTS, MAP_INBOUND_LISTENERS, MAP_ORIG_DST, MAP_POD_ADDRS, MAP_POD_CONFIG,
    MAP_PROBE_PORTS, MAP_PROBE_SOURCES, MAP_SPLICE, PROG_CONNECT4, PROG_CONNECT6, PROG_SENDMSG4,
    PROG_SENDMSG6, PROG_SK_LOOKUP, PROG_SK_MSG, PROG_SOCK_OPS, PROG_SPLICE_TRACK,
};
use aya::{
    maps::SockHash,
    programs::{CgroupSockAddr, SkLookup, SkMsg, SockOps},
    Ebpf, EbpfLoader,
};
use tokio::io::unix::AsyncFd;

use super::{
    maps::{Counters, InboundListeners, OrigDstTable, PodMaps, PodTable},
    EbpfError,
};

/// The object `build.rs` produced. Aligned because the ELF parser reads it in place.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/agent-ebpf"));

/// The loaded object: programs ready to attach, and typed handles to its maps. The
/// original-destination table is handed out separately: the proxy owns it.
/// The outbound redirect's programs on a pod's cgroup, as status and `agent pods` name them.
pub const REDIRECT_PROGRAMS: [&str; 5] = [
    "cgroup/connect4",
    "cgroup/connect6",
    "cgroup/sendmsg4",
    "cgroup/sendmsg6",
    "sock_ops",
];
/// Inbound interception, on a pod's netns.
pub const INBOUND_PROGRAM: &str = "sk_lookup";
/// The splice of an accelerated pod.
pub const SPLICE_PROGRAMS: [&str; 2] = ["sock_ops (splice)", "sk_msg (splice)"];

pub struct Kernel {
    ebpf: Ebpf,
    pub pods: PodTable,
    pub listeners: InboundListeners,
    pub counters: std::sync::Arc<Counters>,
    /// Why the splice's programs were not loaded (the kernel lacks what they call), or
    /// `None` when they were.
    pub splice_off: Option<String>,
}

impl Kernel {
    /// Loads and verifies every program. `kernel_log_level` is aya-log's level (0 = off,
    /// 1 error .. 5 trace); it is checked in the kernel, so quiet levels cost nothing.
    /// Also pins the maps `agent maps` reads under `<pin_root>/maps/` (replacing those of
    /// a previous agent), so they can be inspected from outside this process. The splice's
    /// programs are loaded unless `splice_off` says why the kernel cannot run them: the
    /// verifier would reject the whole program for one unknown helper.
    pub fn load(
        kernel_log_level: u8,
        pin_root: &std::path::Path,
        splice_off: Option<String>,
    ) -> Result<(Self, OrigDstTable), EbpfError> {
        let mut ebpf = EbpfLoader::new()
            .override_global("AYA_LOG_LEVEL", &kernel_log_level, false)
            .load(OBJECT)
            .map_err(EbpfError::Load)?;
        for name in [PROG_CONNECT4, PROG_CONNECT6, PROG_SENDMSG4, PROG_SENDMSG6] {
            let prog: &mut CgroupSockAddr = program(&mut ebpf, name)?;
            prog.load()
                .map_err(|source| EbpfError::Program { name, source })?;
        }
        let prog: &mut SockOps = program(&mut ebpf, PROG_SOCK_OPS)?;
        prog.load().map_err(|source| EbpfError::Program {
            name: PROG_SOCK_OPS,
            source,
        })?;
        let prog: &mut SkLookup = program(&mut ebpf, PROG_SK_LOOKUP)?;
        prog.load().map_err(|source| EbpfError::Program {
            name: PROG_SK_LOOKUP,
            source,
        })?;
        if splice_off.is_none() {
            load_splice(&mut ebpf)?;
        }
        super::dump::pin_maps(&ebpf, pin_root)?;
        let pods = PodTable::new(PodMaps {
            config: take_map(&mut ebpf, MAP_POD_CONFIG)?,
            out_ports: take_map(&mut ebpf, MAP_EXCLUDED_PORTS)?,
            out_cidrs: take_map(&mut ebpf, MAP_EXCLUDED_CIDRS)?,
            agent_cgroups: take_map(&mut ebpf, MAP_AGENT_CGROUPS)?,
            addrs: take_map(&mut ebpf, MAP_POD_ADDRS)?,
            in_ports: take_map(&mut ebpf, MAP_INBOUND_EXCLUDED_PORTS)?,
            probe_ports: take_map(&mut ebpf, MAP_PROBE_PORTS)?,
            probe_sources: take_map(&mut ebpf, MAP_PROBE_SOURCES)?,
            udp_ports: take_map(&mut ebpf, agent_common::MAP_UDP_ALLOW_PORTS)?,
            mesh: take_map(&mut ebpf, agent_common::MAP_MESH_NETWORKS)?,
        })?;
        let listeners = InboundListeners::new(take_map(&mut ebpf, MAP_INBOUND_LISTENERS)?)?;
        let orig_dst = OrigDstTable::new(take_map(&mut ebpf, MAP_ORIG_DST)?)?;
        // Read only by the kernel programs, but checked here so a renamed map fails at start.
        let _ = ebpf.map(MAP_CONNECT_ORIG).ok_or(EbpfError::Missing {
            kind: "map",
            name: MAP_CONNECT_ORIG,
        })?;
        let counters = Counters::new(take_map(&mut ebpf, MAP_COUNTERS)?)?;
        Ok((
            Self {
                ebpf,
                pods,
                listeners,
                counters: std::sync::Arc::new(counters),
                splice_off,
            },
            orig_dst,
        ))
    }

    /// Forwards the programs' aya-log records to the `log` facade, which tracing picks up.
    /// Must be called inside a tokio runtime.
    #[allow(
        unsafe_code,
        reason = "tokio registers a foreign fd only unsafely: the logger owns its ring buffer's fd"
    )]
    pub fn spawn_log_forwarder(&mut self) -> Result<(), EbpfError> {
        let logger = aya_log::EbpfLogger::init(&mut self.ebpf)
            .map_err(|e| EbpfError::Logger(e.to_string()))?;
        // SAFETY: the logger owns its ring buffer's fd and keeps it open, unchanged, for as
        // long as it lives, and the AsyncFd owns the logger.
        let mut fd =
            unsafe { AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) }
                .map_err(|e| EbpfError::Logger(e.to_string()))?;
        tokio::spawn(async move {
            loop {
                let Ok(mut guard) = fd.readable_mut().await else {
                    return;
                };
                guard.get_inner_mut().flush();
                guard.clear_ready();
            }
        });
        Ok(())
    }

    pub fn connect_program(
        &mut self,
        name: &'static str,
    ) -> Result<&mut CgroupSockAddr, EbpfError> {
        program(&mut self.ebpf, name)
    }

    pub fn sock_ops_program(&mut self) -> Result<&mut SockOps, EbpfError> {
        program(&mut self.ebpf, PROG_SOCK_OPS)
    }

    /// The programs loaded and verified at start, as `agent status` names them.
    pub fn programs_loaded(&self) -> Vec<&'static str> {
        let mut p = REDIRECT_PROGRAMS.to_vec();
        p.push(INBOUND_PROGRAM);
        if self.splice_off.is_none() {
            p.extend(SPLICE_PROGRAMS);
        }
        p
    }

    /// The splice's sock_ops program, if it was loaded.
    pub fn splice_track_program(&mut self) -> Option<Result<&mut SockOps, EbpfError>> {
        if self.splice_off.is_some() {
            return None;
        }
        Some(program(&mut self.ebpf, PROG_SPLICE_TRACK))
    }

    pub fn sk_lookup_program(&mut self) -> Result<&mut SkLookup, EbpfError> {
        program(&mut self.ebpf, PROG_SK_LOOKUP)
    }
}

/// Loads splice_track (attached per accelerated pod) and the sk_msg program, which is
/// attached to the SPLICE sockhash for the agent's lifetime: it runs only for sockets that
/// splice_track put there, i.e. only in pods with acceleration on.
fn load_splice(ebpf: &mut Ebpf) -> Result<(), EbpfError> {
    let prog: &mut SockOps = program(ebpf, PROG_SPLICE_TRACK)?;
    prog.load().map_err(|source| EbpfError::Program {
        name: PROG_SPLICE_TRACK,
        source,
    })?;
    let missing = EbpfError::Missing {
        kind: "map",
        name: MAP_SPLICE,
    };
    let fd = {
        let map = ebpf.map(MAP_SPLICE).ok_or(missing)?;
        let hash: SockHash<_, agent_common::SpliceKey> =
            SockHash::try_from(map).map_err(|source| EbpfError::Map {
                name: MAP_SPLICE,
                source,
            })?;
        hash.fd().try_clone().map_err(super::io_err(MAP_SPLICE))?
    };
    let err = |source| EbpfError::Program {
        name: PROG_SK_MSG,
        source,
    };
    let prog: &mut SkMsg = program(ebpf, PROG_SK_MSG)?;
    prog.load().map_err(err)?;
    prog.attach(&fd).map_err(err)?;
    Ok(())
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, EbpfError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let prog = ebpf.program_mut(name).ok_or(EbpfError::Missing {
        kind: "program",
        name,
    })?;
    prog.try_into()
        .map_err(|source| EbpfError::Program { name, source })
}

fn take_map(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<(&'static str, aya::maps::Map), EbpfError> {
    let map = ebpf
        .take_map(name)
        .ok_or(EbpfError::Missing { kind: "map", name })?;
    Ok((name, map))
}
