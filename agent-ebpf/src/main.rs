//! Kernel side of the interception agent.
//!
//! - `connect4` / `connect6` (cgroup/connect4|6 on each enrolled pod's cgroup): rewrite an
//!   application's TCP `connect()` to the agent's outbound listener on the pod's loopback,
//!   remembering the original destination under the socket's cookie.
//! - `record_orig_dst` (sock_ops on the same cgroup): once the kernel has picked the source port
//!   (TCP_CONNECT_CB, before the SYN leaves), re-key the original destination by
//!   (pod, source address, source port), which is what the proxy sees after `accept()`.
//!   It calls no helper newer than 5.7, so the core path runs on kernels without
//!   `bpf_get_netns_cookie` in sock_ops.
//! - `splice_track` and `splice_msg` (`splice`): the splice of accelerated pods, a separate
//!   sock_ops program so that it is loaded only where the kernel offers what it calls.
//! - `steer_inbound` (sk_lookup, `inbound`): inbound interception.
//! - `sendmsg4` / `sendmsg6` (`udp`), with connect4/6 for UDP: outbound UDP to the mesh.
//!
//! Entry points are thin; the logic lives in `try_*` functions returning `Result`.
// On the host (clippy, and `cargo check`) this builds as an ordinary binary so that the
// programs are linted like the rest of the workspace; for bpfel-unknown-none it is the
// no_std object the agent embeds.
#![allow(
    unsafe_code,
    reason = "eBPF programs read their context and map values through raw pointers; every use carries a SAFETY comment"
)]
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

mod inbound;
mod maps;
mod splice;
mod udp;

use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};

use agent_common::{
    v4_mapped, CidrKey, OrigDst, PodConfig, PortKey, SockKey, CIDR_KEY_POD_BITS,
    COUNTER_AGENT_SOCKET, COUNTER_BLOCKED, COUNTER_EXCLUDED_CIDR, COUNTER_EXCLUDED_PORT,
    COUNTER_LOCAL_DST, COUNTER_NOT_TCP, COUNTER_ORIG_MISSING, COUNTER_ORIG_RECORDED,
    COUNTER_REDIRECTED, COUNTER_UNKNOWN_NETNS, POD_FLAG_BLOCK,
};
use aya_ebpf::{
    bindings::{bpf_sock_addr, BPF_SOCK_OPS_TCP_CONNECT_CB},
    helpers::{bpf_get_current_cgroup_id, bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::{cgroup_sock_addr, sock_ops},
    maps::lpm_trie::Key,
    programs::{SockAddrContext, SockOpsContext},
    EbpfContext,
};
use aya_log_ebpf::{debug, warn};
use maps::{
    bump, AGENT_CGROUPS, CONNECT_ORIG, EXCLUDED_CIDRS, EXCLUDED_PORTS, ORIG_DST, POD_CONFIG,
};

/// cgroup/connect return values: 1 lets the connect proceed, 0 fails it with EPERM.
pub(crate) const ALLOW: i32 = 1;
pub(crate) const DENY: i32 = 0;
pub(crate) const IPPROTO_TCP: u32 = 6;
pub(crate) const IPPROTO_UDP: u32 = 17;
pub(crate) const AF_INET: u32 = 2;
pub(crate) const AF_INET6: u32 = 10;

/// An IPv4 address with its 4 bytes in network order, as the kernel stores it.
const LOOPBACK4: [u8; 4] = [127, 0, 0, 1];

#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    verdict(try_connect4(&ctx))
}

#[cgroup_sock_addr(connect6)]
pub fn connect6(ctx: SockAddrContext) -> i32 {
    verdict(try_connect6(&ctx))
}

/// The verifier insists the return value is provably 0 or 1, so map to constants here.
/// An error (the original destination could not be recorded) refuses the connect: letting
/// it out unredirected would leak it, and redirecting it would leave the proxy guessing.
#[inline(always)]
fn verdict(r: Result<i32, i32>) -> i32 {
    match r {
        Ok(ALLOW) => ALLOW,
        _ => DENY,
    }
}

#[sock_ops]
pub fn record_orig_dst(ctx: SockOpsContext) -> u32 {
    let _ = try_sockops(&ctx);
    // The return value of sock_ops only matters for callbacks that ask for a reply.
    1
}

/// Why a connect is left alone, or the pod it belongs to.
enum Verdict {
    Pass(i32),
    /// A UDP socket: judged by `udp::outbound`, never redirected.
    Udp,
    Pod(PodConfig),
}

/// Checks shared by both families, before the address is looked at.
#[inline(always)]
fn classify(ctx: &SockAddrContext) -> Verdict {
    let sa = ctx.sock_addr;
    // SAFETY: `sa` is the context pointer the kernel handed to this program.
    let protocol = unsafe { read_volatile(addr_of!((*sa).protocol)) };
    if protocol == IPPROTO_UDP {
        return Verdict::Udp;
    }
    if protocol != IPPROTO_TCP {
        bump(COUNTER_NOT_TCP);
        return Verdict::Pass(ALLOW);
    }
    // Loop avoidance. The agent's upstream sockets are created by the agent process, so they
    // belong to the agent's cgroup (a socket's cgroup is fixed when it is created, from the
    // creating task). In node mode the agent's cgroup is not below the pod's, so this
    // program never even runs for them; in sidecar mode the agent's container cgroup sits
    // below the pod's and this check is what exempts it. An application cannot forge it: it
    // would have to move itself into another cgroup, which needs write access to that
    // cgroup's `cgroup.procs` on the host. Marks, source addresses and ports are all
    // settable by the application and are deliberately not used.
    if is_agent_socket() {
        bump(COUNTER_AGENT_SOCKET);
        return Verdict::Pass(ALLOW);
    }
    let Some(cfg) = pod_config(ctx) else {
        // The program is only attached to enrolled pods' cgroups, so a connect from a
        // namespace we do not know is a process that left its pod's network namespace.
        // Complete mediation: refuse rather than let it out unseen.
        bump(COUNTER_UNKNOWN_NETNS);
        warn!(ctx, "refusing connect from a network namespace no pod has");
        return Verdict::Pass(DENY);
    };
    if cfg.flags & POD_FLAG_BLOCK != 0 {
        bump(COUNTER_BLOCKED);
        warn!(
            ctx,
            "pod {} is fail-closed and its agent is gone: connect refused", cfg.pod_id
        );
        return Verdict::Pass(DENY);
    }
    Verdict::Pod(cfg)
}

/// Whether the calling task is the agent's own (its upstream sockets are never redirected).
#[inline(always)]
pub(crate) fn is_agent_socket() -> bool {
    // SAFETY: helper without arguments.
    let cgroup = unsafe { bpf_get_current_cgroup_id() };
    AGENT_CGROUPS.get_ptr(cgroup).is_some()
}

/// The enrolled pod whose network namespace the socket is in.
#[inline(always)]
pub(crate) fn pod_config(ctx: &SockAddrContext) -> Option<PodConfig> {
    // SAFETY: valid context pointer for this program type.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: a map value pointer returned by the kernel is valid for this program run.
    POD_CONFIG.get_ptr(netns).map(|cfg| unsafe { *cfg })
}

/// Whether a destination bypasses the agent for this pod.
#[inline(always)]
fn excluded(cfg: &PodConfig, addr: &[u8; 16], port: u16) -> bool {
    if EXCLUDED_PORTS
        .get_ptr(PortKey::new(cfg.pod_id, port))
        .is_some()
    {
        bump(COUNTER_EXCLUDED_PORT);
        return true;
    }
    let key = Key::new(
        CIDR_KEY_POD_BITS + 128,
        CidrKey {
            // Big-endian so that the trie's byte-wise prefix compares the id as a whole.
            pod_id: cfg.pod_id.to_be_bytes(),
            addr: *addr,
        },
    );
    if EXCLUDED_CIDRS.get(&key).is_some() {
        bump(COUNTER_EXCLUDED_CIDR);
        return true;
    }
    false
}

/// Remembers where the socket wanted to go, under its cookie, for `sockops` to re-key.
#[inline(always)]
fn remember(ctx: &SockAddrContext, cfg: &PodConfig, addr: [u8; 16], port: u16) -> Result<(), i32> {
    // SAFETY: valid context pointer for this program type.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let orig = OrigDst {
        addr,
        port,
        _pad: 0,
        pod_id: cfg.pod_id,
    };
    CONNECT_ORIG.insert(cookie, orig, 0)
}

/// An IPv6 address read as four 32-bit context words. Each word holds its part in network
/// byte order, so its in-memory bytes (to_ne_bytes) are the address bytes in order.
#[inline(always)]
pub(crate) fn words_to_bytes(words: [u32; 4]) -> [u8; 16] {
    let mut addr = [0u8; 16];
    for (i, w) in words.iter().enumerate() {
        let b = w.to_ne_bytes();
        addr[i * 4] = b[0];
        addr[i * 4 + 1] = b[1];
        addr[i * 4 + 2] = b[2];
        addr[i * 4 + 3] = b[3];
    }
    addr
}

#[inline(always)]
fn try_connect4(ctx: &SockAddrContext) -> Result<i32, i32> {
    let (addr, port) = udp::dst4(ctx);
    let cfg = match classify(ctx) {
        Verdict::Pass(verdict) => return Ok(verdict),
        Verdict::Udp => return Ok(udp::outbound(ctx, &addr, port)),
        Verdict::Pod(cfg) => cfg,
    };
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    // 127/8 is the pod's own loopback (the agent's listeners live there) and 0/8 means
    // "this host": neither ever leaves the pod. (addr[12] is the first IPv4 octet.)
    if addr[12] == 127 || addr[12] == 0 {
        bump(COUNTER_LOCAL_DST);
        return Ok(ALLOW);
    }
    if excluded(&cfg, &addr, port) {
        return Ok(ALLOW);
    }
    remember(ctx, &cfg, addr, port)?;
    // SAFETY: writable context fields for cgroup/connect4. from_ne_bytes keeps the octets in
    // memory order, i.e. network byte order; the port is converted to network byte order.
    unsafe {
        write_volatile(addr_of_mut!((*sa).user_ip4), u32::from_ne_bytes(LOOPBACK4));
        write_volatile(
            addr_of_mut!((*sa).user_port),
            u32::from(cfg.outbound_port.to_be()),
        );
    }
    bump(COUNTER_REDIRECTED);
    debug!(
        ctx,
        "pod {} connect4 to port {} redirected", cfg.pod_id, port
    );
    Ok(ALLOW)
}

#[inline(always)]
fn try_connect6(ctx: &SockAddrContext) -> Result<i32, i32> {
    let (addr, port) = udp::dst6(ctx);
    let cfg = match classify(ctx) {
        Verdict::Pass(verdict) => return Ok(verdict),
        Verdict::Udp => return Ok(udp::outbound(ctx, &addr, port)),
        Verdict::Pod(cfg) => cfg,
    };
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    let mapped = addr[..10].iter().all(|b| *b == 0) && addr[10] == 0xff && addr[11] == 0xff;
    let unspecified_or_loopback = addr[..15].iter().all(|b| *b == 0) && addr[15] <= 1;
    // An IPv4-mapped destination on a dual-stack socket goes straight to tcp_v4_connect
    // without passing connect4, so IPv4 rules are applied here too: no IPv6 bypass.
    if unspecified_or_loopback || (mapped && (addr[12] == 127 || addr[12] == 0)) {
        bump(COUNTER_LOCAL_DST);
        return Ok(ALLOW);
    }
    if excluded(&cfg, &addr, port) {
        return Ok(ALLOW);
    }
    remember(ctx, &cfg, addr, port)?;
    // The listener that serves a mapped destination is the IPv4 one, reached as
    // ::ffff:127.0.0.1; a native IPv6 destination goes to [::1]. Words are written in
    // network byte order (from_ne_bytes of the octets).
    let last = if mapped {
        u32::from_ne_bytes(LOOPBACK4)
    } else {
        u32::from_ne_bytes([0, 0, 0, 1])
    };
    let third = if mapped {
        u32::from_ne_bytes([0, 0, 0xff, 0xff])
    } else {
        0
    };
    // SAFETY: writable context fields for cgroup/connect6, written word by word.
    unsafe {
        write_volatile(addr_of_mut!((*sa).user_ip6[0]), 0);
        write_volatile(addr_of_mut!((*sa).user_ip6[1]), 0);
        write_volatile(addr_of_mut!((*sa).user_ip6[2]), third);
        write_volatile(addr_of_mut!((*sa).user_ip6[3]), last);
        write_volatile(
            addr_of_mut!((*sa).user_port),
            u32::from(cfg.outbound_port.to_be()),
        );
    }
    bump(COUNTER_REDIRECTED);
    debug!(
        ctx,
        "pod {} connect6 to port {} redirected", cfg.pod_id, port
    );
    Ok(ALLOW)
}

#[inline(always)]
fn try_sockops(ctx: &SockOpsContext) -> Result<(), i32> {
    if ctx.op() == BPF_SOCK_OPS_TCP_CONNECT_CB {
        record(ctx)
    } else {
        Ok(())
    }
}

#[inline(always)]
fn record(ctx: &SockOpsContext) -> Result<(), i32> {
    // SAFETY: valid context pointer for this program type.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(orig) = CONNECT_ORIG.get_ptr(cookie) else {
        // Not a socket connect4/6 redirected (excluded or local destination).
        return Ok(());
    };
    // SAFETY: map value pointer valid for this program run.
    let orig = unsafe { *orig };
    let ops = ctx.ops;
    let addr = match ctx.family() {
        // local_ip4 is in network byte order: its in-memory bytes are the octets.
        AF_INET => v4_mapped(ctx.local_ip4().to_ne_bytes()),
        AF_INET6 => {
            let mut words = [0u32; 4];
            for (i, word) in words.iter_mut().enumerate() {
                // SAFETY: 4-byte context reads (wider loads are rejected by the verifier).
                *word = unsafe { read_volatile(addr_of!((*ops).local_ip6[i])) };
            }
            words_to_bytes(words)
        }
        _ => {
            bump(COUNTER_ORIG_MISSING);
            return Ok(());
        }
    };
    // local_port is in host byte order (unlike remote_port).
    let key = SockKey::new(orig.pod_id, addr, ctx.local_port() as u16);
    if let Err(e) = ORIG_DST.insert(key, orig, 0) {
        bump(COUNTER_ORIG_MISSING);
        return Err(e);
    }
    let _ = CONNECT_ORIG.remove(cookie);
    bump(COUNTER_ORIG_RECORDED);
    Ok(())
}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

#[cfg(not(target_arch = "bpf"))]
fn main() {}
