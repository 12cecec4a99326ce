//! Outbound UDP of pods with `udp_outbound = "deny"`: `connect()` (connect4/6) and
//! unconnected `sendto()`/`sendmsg()` (sendmsg4/6, which the kernel runs only when the call
//! names a destination) to an address in the node's mesh networks, or of an enrolled pod,
//! is refused with EPERM unless the destination port is one of the pod's
//! `udp_allow_ports`. Nothing is redirected: the mesh speaks mutual TLS over TCP, and UDP
//! between its workloads is either declared or refused.
//!
//! A dual-stack socket sending to an IPv4-mapped address is judged by sendmsg4 (the kernel
//! hands such a datagram to the IPv4 path, hook included) or by connect6 with the mapped
//! address, which is how IPv4 is keyed here anyway: no IPv6 way around the IPv4 rules.

use core::ptr::{addr_of, read_volatile};

use agent_common::{
    v4_mapped, PortKey, COUNTER_UDP_OUTBOUND_ALLOWED, COUNTER_UDP_OUTBOUND_DENIED,
    POD_FLAG_UDP_DENY,
};
use aya_ebpf::{macros::cgroup_sock_addr, maps::lpm_trie::Key, programs::SockAddrContext};

use crate::{
    is_agent_socket,
    maps::{bump, MESH_NETWORKS, POD_ADDRS, UDP_ALLOW_PORTS},
    pod_config, words_to_bytes, ALLOW, DENY,
};

#[cgroup_sock_addr(sendmsg4)]
pub fn sendmsg4(ctx: SockAddrContext) -> i32 {
    let (addr, port) = dst4(&ctx);
    match outbound(&ctx, &addr, port) {
        DENY => DENY,
        _ => ALLOW,
    }
}

#[cgroup_sock_addr(sendmsg6)]
pub fn sendmsg6(ctx: SockAddrContext) -> i32 {
    let (addr, port) = dst6(&ctx);
    match outbound(&ctx, &addr, port) {
        DENY => DENY,
        _ => ALLOW,
    }
}

/// The destination of a connect4/sendmsg4, IPv4-mapped.
#[inline(always)]
pub(crate) fn dst4(ctx: &SockAddrContext) -> ([u8; 16], u16) {
    let sa = ctx.sock_addr;
    // SAFETY: context field reads; `user_ip4` holds the address in network byte order, so
    // its in-memory bytes (to_ne_bytes) are the address octets in order.
    let ip = unsafe { read_volatile(addr_of!((*sa).user_ip4)) }.to_ne_bytes();
    // SAFETY: as above; `user_port` holds the port in network byte order in its low 16 bits.
    let port = u16::from_be(unsafe { read_volatile(addr_of!((*sa).user_port)) } as u16);
    (v4_mapped(ip), port)
}

/// The destination of a connect6/sendmsg6.
#[inline(always)]
pub(crate) fn dst6(ctx: &SockAddrContext) -> ([u8; 16], u16) {
    let sa = ctx.sock_addr;
    // The verifier only allows 4-byte (or narrower) loads of user_ip6, so read it word by
    // word with volatile loads that LLVM cannot merge into 8-byte ones.
    let mut words = [0u32; 4];
    for (i, word) in words.iter_mut().enumerate() {
        // SAFETY: context field read within the 4-word array.
        *word = unsafe { read_volatile(addr_of!((*sa).user_ip6[i])) };
    }
    // SAFETY: context field read; network byte order in the low 16 bits.
    let port = u16::from_be(unsafe { read_volatile(addr_of!((*sa).user_port)) } as u16);
    (words_to_bytes(words), port)
}

/// The verdict on a UDP connect or send from an enrolled pod's cgroup to `addr:port`.
#[inline(always)]
pub(crate) fn outbound(ctx: &SockAddrContext, addr: &[u8; 16], port: u16) -> i32 {
    if is_agent_socket() {
        return ALLOW;
    }
    let Some(cfg) = pod_config(ctx) else {
        // UDP from a namespace the agent does not know was never mediated; TCP from one
        // is refused by connect4/6.
        return ALLOW;
    };
    if cfg.flags & POD_FLAG_UDP_DENY == 0 || !in_mesh(addr) {
        return ALLOW;
    }
    if UDP_ALLOW_PORTS
        .get_ptr(PortKey::new(cfg.pod_id, port))
        .is_some()
    {
        bump(COUNTER_UDP_OUTBOUND_ALLOWED);
        return ALLOW;
    }
    bump(COUNTER_UDP_OUTBOUND_DENIED);
    DENY
}

/// An enrolled pod's address, or one inside the node's mesh networks.
#[inline(always)]
fn in_mesh(addr: &[u8; 16]) -> bool {
    POD_ADDRS.get_ptr(*addr).is_some() || MESH_NETWORKS.get(Key::new(128, *addr)).is_some()
}
