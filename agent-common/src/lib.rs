//! Types shared by the eBPF programs and the userspace agent.
//!
//! Every map the programs use is named here and every key and value layout is defined here,
//! once. Layouts are `#[repr(C)]` with fixed-width fields and explicit padding so that the
//! kernel side and userspace agree byte for byte; each size is asserted at compile time.
//!
//! Byte order conventions (the same in every type below):
//! - addresses are stored as 16 bytes in network byte order; IPv4 is stored IPv4-mapped
//!   (`::ffff:a.b.c.d`) so one key type serves both families;
//! - ports are stored in host byte order.
#![no_std]

/// Per-pod configuration, keyed by the pod's network namespace cookie (`u64`).
pub const MAP_POD_CONFIG: &str = "POD_CONFIG";
/// Original destination by socket cookie (`u64`), written at `connect()` time.
pub const MAP_CONNECT_ORIG: &str = "CONNECT_ORIG";
/// Original destination by the redirected socket's source ([`SockKey`]), written once the
/// kernel has chosen the source port; this is what the proxy reads after `accept()`.
pub const MAP_ORIG_DST: &str = "ORIG_DST";
/// Destination ports that bypass the agent, per pod ([`PortKey`]).
pub const MAP_EXCLUDED_PORTS: &str = "EXCLUDED_PORTS";
/// Destination CIDRs that bypass the agent, per pod (LPM trie over [`CidrKey`]).
pub const MAP_EXCLUDED_CIDRS: &str = "EXCLUDED_CIDRS";
/// Cgroup ids (`u64`) whose sockets are the agent's own and are never redirected.
pub const MAP_AGENT_CGROUPS: &str = "AGENT_CGROUPS";
/// Per-CPU event counters indexed by the `COUNTER_*` constants.
pub const MAP_COUNTERS: &str = "COUNTERS";
/// Each enrolled pod's addresses (`[u8; 16]`, network order, IPv4 mapped) to [`InboundPod`],
/// kept live by the agent as addresses come and go in the pod's namespace.
pub const MAP_POD_ADDRS: &str = "POD_ADDRS";
/// The agent's inbound listeners (SOCKMAP), at [`inbound_listener_index`].
pub const MAP_INBOUND_LISTENERS: &str = "INBOUND_LISTENERS";
/// Destination ports of a pod that inbound interception leaves alone ([`PortKey`]).
pub const MAP_INBOUND_EXCLUDED_PORTS: &str = "INBOUND_EXCLUDED_PORTS";
/// Ports of a pod that health probes may reach directly ([`PortKey`]).
pub const MAP_PROBE_PORTS: &str = "PROBE_PORTS";
/// (pod, port) -> 1: UDP a STRICT pod accepts on that local port, or from that remote port.
pub const MAP_UDP_ALLOW_PORTS: &str = "UDP_ALLOW_PORTS";
/// Node addresses that health probes come from (`[u8; 16]`).
pub const MAP_PROBE_SOURCES: &str = "PROBE_SOURCES";
/// The node's `mesh_networks` (LPM trie over an address, `[u8; 16]`): the destinations
/// outbound UDP of a `udp_outbound = "deny"` pod may not reach except its allowed ports.
/// The prefix length of a key is `96 + n` for an IPv4 `/n` (IPv4-mapped), `n` for IPv6.
pub const MAP_MESH_NETWORKS: &str = "MESH_NETWORKS";

/// Sockets of the loopback hop between an application and the agent in the same pod
/// (SOCKHASH keyed by [`SpliceKey`]), for pods with acceleration on.
pub const MAP_SPLICE: &str = "SPLICE";
/// Connections whose first bytes went through TCP because the other end was not in
/// [`MAP_SPLICE`] yet ([`SpliceKey`] to `u32`, LRU): they stay on TCP so bytes never
/// overtake each other. A stale entry only costs a later connection its acceleration.
pub const MAP_SPLICE_OFF: &str = "SPLICE_OFF";

/// Program names, as the loader looks them up in the object.
pub const PROG_CONNECT4: &str = "connect4";
pub const PROG_CONNECT6: &str = "connect6";
pub const PROG_SENDMSG4: &str = "sendmsg4";
pub const PROG_SENDMSG6: &str = "sendmsg6";
/// sock_ops that re-keys original destinations (no helper newer than 5.7: the core path).
pub const PROG_SOCK_OPS: &str = "record_orig_dst";
/// sock_ops that adds both ends of an agent hop to the splice (needs
/// `bpf_get_netns_cookie` in sock_ops, Linux 5.15): loaded only where the kernel has it.
pub const PROG_SPLICE_TRACK: &str = "splice_track";
pub const PROG_SK_LOOKUP: &str = "steer_inbound";
pub const PROG_SK_MSG: &str = "splice_msg";

/// The source address of the agent's own connections to an application in its pod. Packets
/// with a loopback source never arrive from the network (the kernel drops them as
/// martians), so only a process inside the pod's namespace can use it: the same trust
/// boundary as the application itself. (127.0.0.6 is Istio's choice for the same job.)
pub const AGENT_APP_SRC4: [u8; 4] = [127, 0, 0, 6];
/// IPv6 has one loopback address; the agent uses it as source towards the application.
pub const AGENT_APP_SRC6: [u8; 16] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];

/// SOCKMAP slot of a pod's inbound listener for one family.
pub const fn inbound_listener_index(pod_id: u32, v6: bool) -> u32 {
    pod_id * 2 + v6 as u32
}

/// The pod does not want its traffic blocked when the agent is absent.
pub const POD_FLAG_FAIL_OPEN: u32 = 1 << 0;
/// The agent is gone and the pod is fail-closed: refuse every TCP connect.
pub const POD_FLAG_BLOCK: u32 = 1 << 1;
/// Splice the application-to-agent loopback hop in the kernel (sock_ops + sk_msg).
pub const POD_FLAG_ACCELERATE: u32 = 1 << 2;
/// STRICT mode: inbound UDP is dropped except the pod's `udp_allow_ports`.
pub const POD_FLAG_STRICT: u32 = 1 << 3;
/// Outbound UDP (connect or sendto) to a mesh destination is refused unless its port is
/// one of the pod's `udp_allow_ports`.
pub const POD_FLAG_UDP_DENY: u32 = 1 << 4;

pub const COUNTER_REDIRECTED: u32 = 0;
pub const COUNTER_EXCLUDED_PORT: u32 = 1;
pub const COUNTER_EXCLUDED_CIDR: u32 = 2;
pub const COUNTER_LOCAL_DST: u32 = 3;
pub const COUNTER_BLOCKED: u32 = 4;
pub const COUNTER_AGENT_SOCKET: u32 = 5;
pub const COUNTER_UNKNOWN_NETNS: u32 = 6;
pub const COUNTER_ORIG_RECORDED: u32 = 7;
pub const COUNTER_ORIG_MISSING: u32 = 8;
pub const COUNTER_NOT_TCP: u32 = 9;
pub const COUNTER_INBOUND_STEERED: u32 = 10;
pub const COUNTER_INBOUND_NO_LISTENER: u32 = 11;
pub const COUNTER_INBOUND_PROBE: u32 = 12;
pub const COUNTER_INBOUND_AGENT_TO_APP: u32 = 13;
pub const COUNTER_INBOUND_EXCLUDED: u32 = 14;
pub const COUNTER_SPLICE_ADDED: u32 = 15;
pub const COUNTER_SPLICED_MESSAGES: u32 = 16;
pub const COUNTER_SPLICE_FALLBACK: u32 = 17;
/// sk_lookup saw a connection to an address of an enrolled pod that the agent has not
/// learned yet (added moments ago): dropped, so the client retries once it is steered.
pub const COUNTER_INBOUND_UNKNOWN_ADDRESS: u32 = 18;
/// Inbound UDP a STRICT pod (or an address not learned yet) does not accept.
pub const COUNTER_UDP_INBOUND_DROPPED: u32 = 19;
/// Inbound UDP to a STRICT pod let through by its `udp_allow_ports`.
pub const COUNTER_UDP_INBOUND_ALLOWED: u32 = 20;
/// Outbound UDP from a `udp_outbound = "deny"` pod to a mesh destination, refused.
pub const COUNTER_UDP_OUTBOUND_DENIED: u32 = 21;
/// Outbound UDP from such a pod to a mesh destination on one of its `udp_allow_ports`.
pub const COUNTER_UDP_OUTBOUND_ALLOWED: u32 = 22;
pub const NUM_COUNTERS: u32 = 23;

/// Human names of the counters, indexed like the `COUNTER_*` constants.
pub const COUNTER_NAMES: [&str; NUM_COUNTERS as usize] = [
    "redirected",
    "excluded_port",
    "excluded_cidr",
    "local_destination",
    "blocked",
    "agent_socket",
    "unknown_netns",
    "orig_recorded",
    "orig_missing",
    "not_tcp",
    "inbound_steered",
    "inbound_no_listener",
    "inbound_probe",
    "inbound_agent_to_app",
    "inbound_excluded",
    "splice_added",
    "spliced_messages",
    "splice_fallback",
    "inbound_unknown_address",
    "udp_inbound_dropped",
    "udp_inbound_allowed",
    "udp_outbound_denied",
    "udp_outbound_allowed",
];

/// What the kernel needs to know about an enrolled pod.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PodConfig {
    /// Agent-assigned pod number, used to scope every other key.
    pub pod_id: u32,
    /// `POD_FLAG_*` bits.
    pub flags: u32,
    /// The outbound listener's port on the pod's loopback (host byte order).
    pub outbound_port: u16,
    pub _pad: [u8; 6],
}

/// What the inbound program needs to know about the pod that owns an address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InboundPod {
    pub pod_id: u32,
    /// `POD_FLAG_*` bits.
    pub flags: u32,
}

/// The destination an application asked for before the redirect.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OrigDst {
    /// Network byte order; IPv4 is IPv4-mapped.
    pub addr: [u8; 16],
    /// Host byte order.
    pub port: u16,
    pub _pad: u16,
    pub pod_id: u32,
}

/// Identifies a redirected connection as the proxy sees it: the client's source address
/// and port inside the pod's network namespace, scoped by pod so that two pods using the
/// same source address and port never collide.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockKey {
    pub pod_id: u32,
    /// Host byte order.
    pub port: u16,
    pub _pad: u16,
    /// Network byte order; IPv4 is IPv4-mapped.
    pub addr: [u8; 16],
}

/// One end of a loopback hop inside a pod, as that socket sees it. The other end's key has
/// local and remote swapped, which is how a message finds the socket to go to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SpliceKey {
    /// The network namespace cookie: loopback addresses repeat in every pod.
    pub netns: u64,
    /// Network byte order; IPv4 is IPv4-mapped.
    pub local: [u8; 16],
    pub remote: [u8; 16],
    /// Host byte order.
    pub local_port: u32,
    pub remote_port: u32,
}

impl SpliceKey {
    /// The key of the socket at the other end of the same connection.
    pub const fn peer(&self) -> Self {
        Self {
            netns: self.netns,
            local: self.remote,
            remote: self.local,
            local_port: self.remote_port,
            remote_port: self.local_port,
        }
    }
}

/// An excluded destination port of one pod.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PortKey {
    pub pod_id: u32,
    /// Host byte order.
    pub port: u16,
    pub _pad: u16,
}

/// Data of an LPM-trie key: the pod id (all 32 bits always inside the prefix) followed by
/// the address, so one trie serves every pod. The prefix length of a key is
/// `32 + 96 + n` for an IPv4 `/n` (IPv4-mapped) and `32 + n` for an IPv6 `/n`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CidrKey {
    /// The pod id in big-endian byte order: LPM tries compare bytes in order.
    pub pod_id: [u8; 4],
    /// Network byte order; IPv4 is IPv4-mapped.
    pub addr: [u8; 16],
}

/// Prefix bits taken by [`CidrKey::pod_id`].
pub const CIDR_KEY_POD_BITS: u32 = 32;

impl SockKey {
    pub const fn new(pod_id: u32, addr: [u8; 16], port: u16) -> Self {
        Self {
            pod_id,
            port,
            _pad: 0,
            addr,
        }
    }
}

impl PortKey {
    pub const fn new(pod_id: u32, port: u16) -> Self {
        Self {
            pod_id,
            port,
            _pad: 0,
        }
    }
}

/// `::ffff:a.b.c.d` from the four bytes of an IPv4 address in network order.
pub const fn v4_mapped(octets: [u8; 4]) -> [u8; 16] {
    // One 128-bit value written out big-endian, not a byte array with ten zeroes: LLVM
    // turns those into a memset loop whose stack pointer arithmetic the verifier refuses
    // to a loader without CAP_PERFMON (an init container has only CAP_BPF and
    // CAP_NET_ADMIN).
    (0xffff_0000_0000u128 | u32::from_be_bytes(octets) as u128).to_be_bytes()
}

const _: () = assert!(matches!(
    v4_mapped([10, 1, 2, 3]),
    [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 1, 2, 3]
));
const _: () = assert!(core::mem::size_of::<PodConfig>() == 16);
const _: () = assert!(core::mem::size_of::<OrigDst>() == 24);
const _: () = assert!(core::mem::size_of::<SockKey>() == 24);
const _: () = assert!(core::mem::size_of::<PortKey>() == 8);
const _: () = assert!(core::mem::size_of::<CidrKey>() == 20);
const _: () = assert!(core::mem::size_of::<InboundPod>() == 8);
const _: () = assert!(core::mem::size_of::<SpliceKey>() == 48);

#[cfg(feature = "user")]
#[allow(
    unsafe_code,
    reason = "aya::Pod is an unsafe marker trait: these layouts are valid for every bit pattern"
)]
mod user {
    // SAFETY (all impls): the types are `#[repr(C)]`, `Copy`, made only of integers and
    // byte arrays with explicit padding fields, so every bit pattern is valid.
    unsafe impl aya::Pod for super::PodConfig {}
    unsafe impl aya::Pod for super::OrigDst {}
    unsafe impl aya::Pod for super::SockKey {}
    unsafe impl aya::Pod for super::PortKey {}
    unsafe impl aya::Pod for super::CidrKey {}
    unsafe impl aya::Pod for super::InboundPod {}
    unsafe impl aya::Pod for super::SpliceKey {}
}
