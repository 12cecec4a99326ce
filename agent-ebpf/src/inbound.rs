//! `steer_inbound` (sk_lookup on each enrolled pod's network namespace): hands new TCP
//! connections to the pod's addresses to the agent's inbound listener, keeping the original
//! local address, so the proxy learns the application port from `getsockname()` without any
//! port change or DNAT.
//!
//! UDP: the kernel looks up connected sockets before it runs sk_lookup, so replies to an
//! application's connected UDP socket never reach this program. Every other datagram to a
//! STRICT pod is dropped unless its local port (a service the pod offers) or its remote
//! port (replies from a service it uses, such as DNS on 53, to an unconnected socket) is
//! one of the pod's `udp_allow_ports`.

use core::ptr::{addr_of, read_volatile};

use agent_common::{
    inbound_listener_index, v4_mapped, PortKey, AGENT_APP_SRC4, AGENT_APP_SRC6,
    COUNTER_INBOUND_AGENT_TO_APP, COUNTER_INBOUND_EXCLUDED, COUNTER_INBOUND_NO_LISTENER,
    COUNTER_INBOUND_PROBE, COUNTER_INBOUND_STEERED, COUNTER_INBOUND_UNKNOWN_ADDRESS,
    COUNTER_UDP_INBOUND_ALLOWED, COUNTER_UDP_INBOUND_DROPPED, POD_FLAG_FAIL_OPEN, POD_FLAG_STRICT,
};
use aya_ebpf::{macros::sk_lookup, programs::SkLookupContext};

use crate::{
    maps::{
        bump, INBOUND_EXCLUDED_PORTS, INBOUND_LISTENERS, POD_ADDRS, PROBE_PORTS, PROBE_SOURCES,
        UDP_ALLOW_PORTS,
    },
    words_to_bytes, AF_INET, IPPROTO_TCP, IPPROTO_UDP,
};

/// sk_lookup verdicts.
const SK_PASS: u32 = 1;
const SK_DROP: u32 = 0;

#[sk_lookup]
pub fn steer_inbound(ctx: SkLookupContext) -> u32 {
    match try_steer_inbound(&ctx) {
        SK_DROP => SK_DROP,
        _ => SK_PASS,
    }
}

#[inline(always)]
fn try_steer_inbound(ctx: &SkLookupContext) -> u32 {
    let l = ctx.lookup;
    // Every context field is read up front, unconditionally: LLVM otherwise hoists the
    // context-pointer arithmetic of a conditional read into a shared register, and the
    // verifier refuses "dereference of modified ctx ptr" (as in splice.rs).
    // SAFETY (all context reads below): `l` is the context the kernel passed; fields are
    // read with 4-byte volatile loads, the widest the verifier accepts for them.
    let protocol = unsafe { read_volatile(addr_of!((*l).protocol)) };
    let family = unsafe { read_volatile(addr_of!((*l).family)) };
    // IPv4 addresses are in network byte order: in-memory bytes are the octets.
    let local4 = unsafe { read_volatile(addr_of!((*l).local_ip4)) }.to_ne_bytes();
    let remote4 = unsafe { read_volatile(addr_of!((*l).remote_ip4)) }.to_ne_bytes();
    let (mut lw, mut rw) = ([0u32; 4], [0u32; 4]);
    for i in 0..4 {
        lw[i] = unsafe { read_volatile(addr_of!((*l).local_ip6[i])) };
        rw[i] = unsafe { read_volatile(addr_of!((*l).remote_ip6[i])) };
    }
    // local_port is in host byte order; remote_port is in network byte order.
    let port = unsafe { read_volatile(addr_of!((*l).local_port)) } as u16;
    let remote_port = u16::from_be(unsafe { read_volatile(addr_of!((*l).remote_port)) });
    if protocol != IPPROTO_TCP && protocol != IPPROTO_UDP {
        return SK_PASS;
    }
    let v4 = family == AF_INET;
    let (local, remote) = if v4 {
        (v4_mapped(local4), v4_mapped(remote4))
    } else {
        (words_to_bytes(lw), words_to_bytes(rw))
    };
    if protocol == IPPROTO_UDP {
        return udp_verdict(&local, port, remote_port);
    }
    // This program runs only in enrolled pods' namespaces, so every non-loopback local
    // address is the pod's. One the agent has not learned yet (added a moment ago) is
    // dropped, never passed: the client's SYN is retried once the agent steers it.
    let Some(pod) = POD_ADDRS.get_ptr(local) else {
        if is_loopback(&local) {
            return SK_PASS;
        }
        bump(COUNTER_INBOUND_UNKNOWN_ADDRESS);
        return SK_DROP;
    };
    // SAFETY: map value pointer valid for this program run.
    let pod = unsafe { *pod };
    // The agent's own connection to the application must reach it, not loop back.
    if remote == v4_mapped(AGENT_APP_SRC4) || remote == AGENT_APP_SRC6 {
        bump(COUNTER_INBOUND_AGENT_TO_APP);
        return SK_PASS;
    }
    let key = PortKey::new(pod.pod_id, port);
    if INBOUND_EXCLUDED_PORTS.get_ptr(key).is_some() {
        bump(COUNTER_INBOUND_EXCLUDED);
        return SK_PASS;
    }
    // Health probes: plaintext, only from a node address, only to a declared probe port.
    if PROBE_PORTS.get_ptr(key).is_some() && PROBE_SOURCES.get_ptr(remote).is_some() {
        bump(COUNTER_INBOUND_PROBE);
        return SK_PASS;
    }
    let index = inbound_listener_index(pod.pod_id, !v4);
    if INBOUND_LISTENERS.redirect_sk_lookup(ctx, index, 0).is_ok() {
        bump(COUNTER_INBOUND_STEERED);
        return SK_PASS;
    }
    // No listener: the agent is not (or no longer) running. A listener socket leaves the
    // SOCKMAP when it closes, so this holds even after SIGKILL.
    bump(COUNTER_INBOUND_NO_LISTENER);
    if pod.flags & POD_FLAG_FAIL_OPEN != 0 {
        SK_PASS
    } else {
        SK_DROP
    }
}

/// A datagram to one of the namespace's addresses, not for a connected socket.
#[inline(always)]
fn udp_verdict(local: &[u8; 16], port: u16, remote_port: u16) -> u32 {
    let Some(pod) = POD_ADDRS.get_ptr(*local) else {
        if is_loopback(local) {
            return SK_PASS;
        }
        // As for TCP: an address the agent has not learned yet is not let through.
        bump(COUNTER_UDP_INBOUND_DROPPED);
        return SK_DROP;
    };
    // SAFETY: map value pointer valid for this program run.
    let pod = unsafe { *pod };
    if pod.flags & POD_FLAG_STRICT == 0 {
        return SK_PASS;
    }
    if UDP_ALLOW_PORTS
        .get_ptr(PortKey::new(pod.pod_id, port))
        .is_some()
        || UDP_ALLOW_PORTS
            .get_ptr(PortKey::new(pod.pod_id, remote_port))
            .is_some()
    {
        bump(COUNTER_UDP_INBOUND_ALLOWED);
        return SK_PASS;
    }
    bump(COUNTER_UDP_INBOUND_DROPPED);
    SK_DROP
}

/// 127.0.0.0/8 (stored IPv4-mapped) or ::1. Loopback traffic never arrives from the
/// network, so it is the pod's own business.
#[inline(always)]
fn is_loopback(a: &[u8; 16]) -> bool {
    // Byte by byte: no memcmp in BPF.
    let mut zero_to_10 = true;
    let mut i = 0;
    while i < 10 {
        zero_to_10 &= a[i] == 0;
        i += 1;
    }
    let mapped = zero_to_10 && a[10] == 0xff && a[11] == 0xff;
    let v6_one = zero_to_10
        && a[10] == 0
        && a[11] == 0
        && a[12] == 0
        && a[13] == 0
        && a[14] == 0
        && a[15] == 1;
    (mapped && a[12] == 127) || v6_one
}
