//! Map definitions. Names and layouts come from `agent-common`; the static names here must
//! equal the `MAP_*` constants there (the loader fails loudly if one is missing).

use agent_common::{
    CidrKey, InboundPod, OrigDst, PodConfig, PortKey, SockKey, SpliceKey, NUM_COUNTERS,
};
use aya_ebpf::{
    macros::map,
    maps::{HashMap, LpmTrie, LruHashMap, PerCpuArray, SockHash, SockMap},
};

/// Enough for every pod a node runs, with room to spare.
const MAX_PODS: u32 = 1024;
/// Connections between connect() and the proxy's accept(); LRU so a connect that never
/// completes (refused, timed out) cannot fill the map.
const MAX_PENDING: u32 = 65536;

#[map]
pub static POD_CONFIG: HashMap<u64, PodConfig> = HashMap::with_max_entries(MAX_PODS, 0);

#[map]
pub static CONNECT_ORIG: LruHashMap<u64, OrigDst> = LruHashMap::with_max_entries(MAX_PENDING, 0);

#[map]
pub static ORIG_DST: LruHashMap<SockKey, OrigDst> = LruHashMap::with_max_entries(MAX_PENDING, 0);

#[map]
pub static EXCLUDED_PORTS: HashMap<PortKey, u32> = HashMap::with_max_entries(MAX_PODS * 16, 0);

#[map]
pub static EXCLUDED_CIDRS: LpmTrie<CidrKey, u32> = LpmTrie::with_max_entries(MAX_PODS * 16, 0);

#[map]
pub static AGENT_CGROUPS: HashMap<u64, u32> = HashMap::with_max_entries(64, 0);

#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(NUM_COUNTERS, 0);

#[map]
pub static POD_ADDRS: HashMap<[u8; 16], InboundPod> = HashMap::with_max_entries(MAX_PODS * 4, 0);

#[map]
pub static INBOUND_LISTENERS: SockMap = SockMap::with_max_entries(MAX_PODS * 2 + 2, 0);

#[map]
pub static INBOUND_EXCLUDED_PORTS: HashMap<PortKey, u32> =
    HashMap::with_max_entries(MAX_PODS * 16, 0);

#[map]
pub static PROBE_PORTS: HashMap<PortKey, u32> = HashMap::with_max_entries(MAX_PODS * 16, 0);

#[map]
pub static UDP_ALLOW_PORTS: HashMap<PortKey, u32> = HashMap::with_max_entries(MAX_PODS * 16, 0);

/// A node has a handful of mesh networks (pod CIDRs per family, a few more at most).
#[map]
pub static MESH_NETWORKS: LpmTrie<[u8; 16], u32> = LpmTrie::with_max_entries(64, 0);

#[map]
pub static PROBE_SOURCES: HashMap<[u8; 16], u32> = HashMap::with_max_entries(64, 0);

/// Both ends of every accelerated app-to-agent connection on the node.
#[map]
pub static SPLICE: SockHash<SpliceKey> = SockHash::with_max_entries(MAX_PENDING, 0);

#[map]
pub static SPLICE_OFF: LruHashMap<SpliceKey, u32> = LruHashMap::with_max_entries(4096, 0);

/// Adds one to a per-CPU counter; per-CPU so no atomics are needed.
#[inline(always)]
pub fn bump(index: u32) {
    if let Some(slot) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, and programs do not migrate CPU while running.
        unsafe { *slot += 1 };
    }
}
