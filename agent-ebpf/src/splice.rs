//! Kernel splice of the loopback hop between an application and the agent in the same pod,
//! for pods with acceleration on.
//!
//! - `splice_track` (sock_ops, ACTIVE/PASSIVE_ESTABLISHED, on an accelerated pod's cgroup and
//!   on the agent's): both
//!   ends of that hop go into the SPLICE sockhash, keyed by how each socket sees the
//!   connection. The hops are: application → outbound listener (both ends on loopback, one
//!   of them the outbound port) and agent → application on inbound (one end the agent's
//!   source address towards the application, the other the pod's address).
//! - `splice_msg` (sk_msg on SPLICE): a message sent on one end goes straight into the
//!   other end's receive queue, skipping TCP/IP and loopback for that hop.
//!
//! Ordering: a message sent before the other end was added (it goes through TCP) marks the
//! connection in SPLICE_OFF, and that sender then stays on TCP, so later bytes can never
//! overtake earlier ones.

use core::ptr::{addr_of, read_volatile};

use agent_common::{
    v4_mapped, SpliceKey, AGENT_APP_SRC4, AGENT_APP_SRC6, COUNTER_SPLICED_MESSAGES,
    COUNTER_SPLICE_ADDED, COUNTER_SPLICE_FALLBACK, POD_FLAG_ACCELERATE,
};
use aya_ebpf::{
    bindings::{
        BPF_ANY, BPF_F_INGRESS, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
    },
    helpers::bpf_get_netns_cookie,
    macros::{sk_msg, sock_ops},
    programs::{SkMsgContext, SockOpsContext},
    EbpfContext,
};

use crate::{
    maps::{bump, POD_CONFIG, SPLICE, SPLICE_OFF},
    words_to_bytes, AF_INET, AF_INET6,
};

/// sk_msg verdict: let the message go (redirected if a redirect was set).
const SK_PASS: u32 = 1;

#[sock_ops]
pub fn splice_track(ctx: SockOpsContext) -> u32 {
    let op = ctx.op();
    if op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB || op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB {
        let _ = track(&ctx);
    }
    // The return value of sock_ops only matters for callbacks that ask for a reply.
    1
}

#[sk_msg]
pub fn splice_msg(ctx: SkMsgContext) -> u32 {
    try_splice_msg(&ctx);
    // Never drop: a message that cannot be spliced goes through TCP.
    SK_PASS
}

#[inline(always)]
fn is_loopback(a: &[u8; 16]) -> bool {
    let v6_loopback = a[..15].iter().all(|b| *b == 0) && a[15] == 1;
    let v4_mapped_loopback =
        a[..10].iter().all(|b| *b == 0) && a[10] == 0xff && a[11] == 0xff && a[12] == 127;
    v6_loopback || v4_mapped_loopback
}

#[inline(always)]
fn is_app_source(a: &[u8; 16]) -> bool {
    *a == v4_mapped(AGENT_APP_SRC4) || *a == AGENT_APP_SRC6
}

/// Whether a connection is one of the two hops between the agent and the application.
#[inline(always)]
fn is_agent_hop(k: &SpliceKey, outbound_port: u32) -> bool {
    let (l, r) = (is_loopback(&k.local), is_loopback(&k.remote));
    let outbound = l && r && (k.local_port == outbound_port || k.remote_port == outbound_port);
    let inbound = (is_app_source(&k.local) && !r) || (is_app_source(&k.remote) && !l);
    outbound || inbound
}

/// Once a connection is established (either side).
#[inline(always)]
fn track(ctx: &SockOpsContext) -> Result<(), i32> {
    // SAFETY: valid context pointer for this program type (helper allowed since 5.15).
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: a read-only lookup; the value is copied out at once.
    let Some(cfg) = (unsafe { POD_CONFIG.get(netns) }).copied() else {
        return Ok(());
    };
    if cfg.flags & POD_FLAG_ACCELERATE == 0 {
        return Ok(());
    }
    let ops = ctx.ops;
    let (local, remote) = match ctx.family() {
        // local_ip4/remote_ip4 are in network byte order: their in-memory bytes are the
        // octets in order.
        AF_INET => (
            v4_mapped(ctx.local_ip4().to_ne_bytes()),
            v4_mapped(ctx.remote_ip4().to_ne_bytes()),
        ),
        AF_INET6 => {
            let (mut l, mut r) = ([0u32; 4], [0u32; 4]);
            for i in 0..4 {
                // SAFETY: 4-byte context reads (wider loads are rejected by the verifier).
                l[i] = unsafe { read_volatile(addr_of!((*ops).local_ip6[i])) };
                // SAFETY: as above.
                r[i] = unsafe { read_volatile(addr_of!((*ops).remote_ip6[i])) };
            }
            (words_to_bytes(l), words_to_bytes(r))
        }
        _ => return Ok(()),
    };
    let mut key = SpliceKey {
        netns,
        local,
        remote,
        // local_port is in host byte order; remote_port holds the port in network byte
        // order in its upper 16 bits (the kernel shifts it there), so from_be gives it.
        local_port: ctx.local_port(),
        remote_port: u32::from_be(ctx.remote_port()),
    };
    if !is_agent_hop(&key, u32::from(cfg.outbound_port)) {
        return Ok(());
    }
    // SAFETY: `ops` is this program's context, which bpf_sock_hash_update expects.
    SPLICE.update(&mut key, unsafe { &mut *ops }, u64::from(BPF_ANY))?;
    bump(COUNTER_SPLICE_ADDED);
    Ok(())
}

#[inline(always)]
fn try_splice_msg(ctx: &SkMsgContext) {
    let m = ctx.msg;
    // Every context field is read up front, unconditionally, with 4-byte volatile loads:
    // the verifier only accepts loads at a constant offset from the unmodified context
    // pointer, and reads inside branches let LLVM hoist the pointer arithmetic.
    // SAFETY (all reads): `m` is the context the kernel passed.
    let family = unsafe { read_volatile(addr_of!((*m).family)) };
    let l4 = unsafe { read_volatile(addr_of!((*m).local_ip4)) };
    let r4 = unsafe { read_volatile(addr_of!((*m).remote_ip4)) };
    let mut l6 = [0u32; 4];
    let mut r6 = [0u32; 4];
    for i in 0..4 {
        l6[i] = unsafe { read_volatile(addr_of!((*m).local_ip6[i])) };
        r6[i] = unsafe { read_volatile(addr_of!((*m).remote_ip6[i])) };
    }
    let local_port = unsafe { read_volatile(addr_of!((*m).local_port)) };
    let remote_port = unsafe { read_volatile(addr_of!((*m).remote_port)) };
    let (local, remote) = if family == AF_INET {
        // Network byte order: in-memory bytes are the octets.
        (v4_mapped(l4.to_ne_bytes()), v4_mapped(r4.to_ne_bytes()))
    } else {
        (words_to_bytes(l6), words_to_bytes(r6))
    };
    // SAFETY: valid context pointer for sk_msg (helper allowed since 5.15).
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let own = SpliceKey {
        netns,
        local,
        remote,
        // Same conventions as in sock_ops: local in host order, remote in network order
        // in the upper 16 bits.
        local_port,
        remote_port: u32::from_be(remote_port),
    };
    // SAFETY: read-only lookup.
    if unsafe { SPLICE_OFF.get(own) }.is_some() {
        return;
    }
    let mut peer = own.peer();
    if SPLICE.redirect_msg(ctx, &mut peer, u64::from(BPF_F_INGRESS)) == i64::from(SK_PASS) {
        bump(COUNTER_SPLICED_MESSAGES);
    } else {
        // The other end is not there (yet, or any more): this message goes through TCP,
        // and so must every later one from this socket.
        let _ = SPLICE_OFF.insert(own, 1, 0);
        bump(COUNTER_SPLICE_FALLBACK);
    }
}
