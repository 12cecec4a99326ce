//! Typed handles to the kernel maps. Layouts come from `agent-common`.

use std::{
    cell::RefCell,
    net::IpAddr,
    os::fd::{AsFd, AsRawFd, OwnedFd},
};

use agent_common::{
    inbound_listener_index, v4_mapped, CidrKey, InboundPod, OrigDst, PodConfig, PortKey, SockKey,
    CIDR_KEY_POD_BITS, COUNTER_NAMES, NUM_COUNTERS,
};
use aya::maps::{
    lpm_trie::{Key, LpmTrie},
    HashMap, IterableMap, Map, MapData, MapError, PerCpuArray, SockMap,
};
use ipnet::IpNet;

use super::EbpfError;

type Named = (&'static str, Map);

fn typed<T>(named: Named) -> Result<T, EbpfError>
where
    T: TryFrom<Map, Error = MapError>,
{
    let (name, map) = named;
    T::try_from(map).map_err(|source| EbpfError::Map { name, source })
}

fn map_err(name: &'static str) -> impl FnOnce(MapError) -> EbpfError {
    move |source| EbpfError::Map { name, source }
}

/// An address as the kernel maps store it: 16 bytes, network order, IPv4 mapped.
pub fn addr16(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4_mapped(v4.octets()),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4_mapped(v4.octets()),
            None => v6.octets(),
        },
    }
}

/// The inverse of [`addr16`]: an IPv4-mapped address comes back as IPv4.
pub fn ip_from16(addr: [u8; 16]) -> IpAddr {
    let v6 = std::net::Ipv6Addr::from(addr);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

/// Everything the kernel is told about one enrolled pod, except its addresses, which
/// change while it runs ([`PodTable::add_address`]).
#[derive(Debug, Clone)]
pub struct PodEntry {
    pub netns_cookie: u64,
    pub config: PodConfig,
    pub outbound_excluded_ports: Vec<u16>,
    pub outbound_excluded_cidrs: Vec<IpNet>,
    pub inbound_excluded_ports: Vec<u16>,
    pub probe_ports: Vec<u16>,
    pub udp_allow_ports: Vec<u16>,
}

/// Per-pod state in the kernel, plus the node-wide agent cgroups and probe sources.
pub struct PodTable {
    config: HashMap<MapData, u64, PodConfig>,
    out_ports: HashMap<MapData, PortKey, u32>,
    out_cidrs: LpmTrie<MapData, CidrKey, u32>,
    agent_cgroups: HashMap<MapData, u64, u32>,
    addrs: HashMap<MapData, [u8; 16], InboundPod>,
    in_ports: HashMap<MapData, PortKey, u32>,
    probe_ports: HashMap<MapData, PortKey, u32>,
    probe_sources: HashMap<MapData, [u8; 16], u32>,
    udp_ports: HashMap<MapData, PortKey, u32>,
    mesh: LpmTrie<MapData, [u8; 16], u32>,
}

/// The maps behind a [`PodTable`], by name.
pub(super) struct PodMaps {
    pub config: Named,
    pub out_ports: Named,
    pub out_cidrs: Named,
    pub agent_cgroups: Named,
    pub addrs: Named,
    pub in_ports: Named,
    pub probe_ports: Named,
    pub probe_sources: Named,
    pub udp_ports: Named,
    pub mesh: Named,
}

impl PodTable {
    pub(super) fn new(m: PodMaps) -> Result<Self, EbpfError> {
        Ok(Self {
            config: typed(m.config)?,
            out_ports: typed(m.out_ports)?,
            out_cidrs: typed(m.out_cidrs)?,
            agent_cgroups: typed(m.agent_cgroups)?,
            addrs: typed(m.addrs)?,
            in_ports: typed(m.in_ports)?,
            probe_ports: typed(m.probe_ports)?,
            probe_sources: typed(m.probe_sources)?,
            udp_ports: typed(m.udp_ports)?,
            mesh: typed(m.mesh)?,
        })
    }

    pub fn exempt_agent_cgroup(&mut self, cgroup_id: u64) -> Result<(), EbpfError> {
        self.agent_cgroups
            .insert(cgroup_id, 1, 0)
            .map_err(map_err(agent_common::MAP_AGENT_CGROUPS))
    }

    pub fn add_probe_source(&mut self, ip: IpAddr) -> Result<(), EbpfError> {
        self.probe_sources
            .insert(addr16(ip), 1, 0)
            .map_err(map_err(agent_common::MAP_PROBE_SOURCES))
    }

    /// A network of the mesh: outbound UDP of `udp_outbound = "deny"` pods may not reach it.
    pub fn add_mesh_network(&mut self, net: &IpNet) -> Result<(), EbpfError> {
        let (addr, bits) = prefix(net);
        self.mesh
            .insert(&Key::new(bits, addr), 1, 0)
            .map_err(map_err(agent_common::MAP_MESH_NETWORKS))
    }

    /// Changes only the pod's flags (e.g. to block it when the agent leaves).
    pub fn set_config(&mut self, netns_cookie: u64, cfg: PodConfig) -> Result<(), EbpfError> {
        self.config
            .insert(netns_cookie, cfg, 0)
            .map_err(map_err(agent_common::MAP_POD_CONFIG))
    }

    /// Writes the whole entry; the pod's configuration goes last, so a program never sees
    /// a pod before its exclusions.
    pub fn install(&mut self, e: &PodEntry) -> Result<(), EbpfError> {
        let id = e.config.pod_id;
        for port in &e.outbound_excluded_ports {
            self.out_ports
                .insert(PortKey::new(id, *port), 1, 0)
                .map_err(map_err(agent_common::MAP_EXCLUDED_PORTS))?;
        }
        for net in &e.outbound_excluded_cidrs {
            self.out_cidrs
                .insert(&cidr_key(id, net), 1, 0)
                .map_err(map_err(agent_common::MAP_EXCLUDED_CIDRS))?;
        }
        for port in &e.inbound_excluded_ports {
            self.in_ports
                .insert(PortKey::new(id, *port), 1, 0)
                .map_err(map_err(agent_common::MAP_INBOUND_EXCLUDED_PORTS))?;
        }
        for port in &e.probe_ports {
            self.probe_ports
                .insert(PortKey::new(id, *port), 1, 0)
                .map_err(map_err(agent_common::MAP_PROBE_PORTS))?;
        }
        for port in &e.udp_allow_ports {
            self.udp_ports
                .insert(PortKey::new(id, *port), 1, 0)
                .map_err(map_err(agent_common::MAP_UDP_ALLOW_PORTS))?;
        }
        self.set_config(e.netns_cookie, e.config)
    }

    /// Steers inbound connections to `ip` to the pod's listener.
    pub fn add_address(&mut self, e: &PodEntry, ip: IpAddr) -> Result<(), EbpfError> {
        let inbound = InboundPod {
            pod_id: e.config.pod_id,
            flags: e.config.flags,
        };
        self.addrs
            .insert(addr16(ip), inbound, 0)
            .map_err(map_err(agent_common::MAP_POD_ADDRS))
    }

    /// Stops steering `ip` (the pod no longer has it). Best effort.
    pub fn remove_address(&mut self, ip: IpAddr) {
        let _ = self.addrs.remove(&addr16(ip));
    }

    /// Forgets a pod entirely (its addresses are removed by the caller, who knows which
    /// ones it owns). Best effort: a missing entry is already what we want.
    pub fn remove(&mut self, e: &PodEntry) {
        let _ = self.config.remove(&e.netns_cookie);
        self.remove_exclusions(e);
    }

    /// Removes the pod's exclusions and probe ports, keeping its configuration (a blocked
    /// pod refuses every connect before they are looked at).
    pub fn remove_exclusions(&mut self, e: &PodEntry) {
        let id = e.config.pod_id;
        for port in &e.outbound_excluded_ports {
            let _ = self.out_ports.remove(&PortKey::new(id, *port));
        }
        for net in &e.outbound_excluded_cidrs {
            let _ = self.out_cidrs.remove(&cidr_key(id, net));
        }
        for port in &e.inbound_excluded_ports {
            let _ = self.in_ports.remove(&PortKey::new(id, *port));
        }
        for port in &e.probe_ports {
            let _ = self.probe_ports.remove(&PortKey::new(id, *port));
        }
        for port in &e.udp_allow_ports {
            let _ = self.udp_ports.remove(&PortKey::new(id, *port));
        }
    }
}

/// The SOCKMAP through which sk_lookup hands connections to the inbound listeners.
pub struct InboundListeners {
    map: SockMap<MapData>,
}

impl InboundListeners {
    pub(super) fn new(map: Named) -> Result<Self, EbpfError> {
        Ok(Self { map: typed(map)? })
    }

    pub fn set(&mut self, pod_id: u32, v6: bool, listener: &impl AsRawFd) -> Result<(), EbpfError> {
        self.map
            .set(inbound_listener_index(pod_id, v6), listener, 0)
            .map_err(map_err(agent_common::MAP_INBOUND_LISTENERS))
    }
}

/// A network as an address-keyed trie stores it: the address and its prefix length.
fn prefix(net: &IpNet) -> ([u8; 16], u32) {
    match net {
        // IPv4 is stored mapped, so its prefix starts after the 96-bit ::ffff: part.
        IpNet::V4(v4) => (
            v4_mapped(v4.network().octets()),
            96 + u32::from(v4.prefix_len()),
        ),
        IpNet::V6(v6) => (v6.network().octets(), u32::from(v6.prefix_len())),
    }
}

fn cidr_key(pod_id: u32, net: &IpNet) -> Key<CidrKey> {
    let (addr, bits) = prefix(net);
    Key::new(
        CIDR_KEY_POD_BITS + bits,
        CidrKey {
            // Big-endian: the trie compares bytes in order, most significant first.
            pod_id: pod_id.to_be_bytes(),
            addr,
        },
    )
}

/// Original destinations recorded by the kernel, read once by the proxy after `accept()`.
///
/// Reading deletes the entry, and aya's map handles need `&mut` for that. Rather than
/// serialising every accept on one lock, each thread keeps its own handle on the same map
/// (a duplicate of its descriptor), made the first time that thread accepts.
pub struct OrigDstTable {
    fd: OwnedFd,
    /// Tells this table's per-thread handles from another table's (tests load several).
    id: u64,
    /// After a hot restart, the previous agent's map: its programs may still redirect a
    /// connection (recording it there) that this agent accepts.
    previous: std::sync::OnceLock<OwnedFd>,
}

type OrigDstMap = HashMap<MapData, SockKey, OrigDst>;

thread_local! {
    static LOCAL_ORIG_DST: RefCell<Option<(u64, OrigDstMap)>> = const { RefCell::new(None) };
    static LOCAL_PREVIOUS: RefCell<Option<(u64, OrigDstMap)>> = const { RefCell::new(None) };
}

impl OrigDstTable {
    pub(super) fn new(map: Named) -> Result<Self, EbpfError> {
        let (name, map) = map;
        // Checks the key and value sizes once, here.
        let typed: OrigDstMap = typed((name, map))?;
        let fd = typed
            .map()
            .fd()
            .as_fd()
            .try_clone_to_owned()
            .map_err(super::io_err(name))?;
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        Ok(Self {
            fd,
            id: NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            previous: std::sync::OnceLock::new(),
        })
    }

    /// A second descriptor of the map, for a new agent to look in (hot restart).
    pub fn dup_fd(&self) -> std::io::Result<OwnedFd> {
        self.fd.try_clone()
    }

    /// Also looks in a previous agent's map (its descriptor, handed over) when this one
    /// has no entry. Checked like our own: the same key and value sizes, or refused.
    pub fn adopt_previous(&self, fd: OwnedFd) -> Result<(), EbpfError> {
        let name = agent_common::MAP_ORIG_DST;
        let data = MapData::from_fd(fd.try_clone().map_err(super::io_err(name))?)
            .map_err(map_err(name))?;
        let _: OrigDstMap = OrigDstMap::try_from(Map::LruHashMap(data)).map_err(map_err(name))?;
        let _ = self.previous.set(fd);
        Ok(())
    }

    fn handle(fd: &OwnedFd) -> Option<OrigDstMap> {
        let data = MapData::from_fd(fd.try_clone().ok()?).ok()?;
        OrigDstMap::try_from(Map::LruHashMap(data)).ok()
    }

    /// Looks the entry up and deletes it: each redirected connection is accepted once, and
    /// the LRU map must not fill with entries nobody will read again.
    pub fn take(&self, key: &SockKey) -> Option<OrigDst> {
        let ours = take_from(&LOCAL_ORIG_DST, self.id, &self.fd, key);
        match (ours, self.previous.get()) {
            (None, Some(previous)) => take_from(&LOCAL_PREVIOUS, self.id, previous, key),
            (ours, _) => ours,
        }
    }
}

/// Looks `key` up in the map behind `fd` through this thread's handle (made once per
/// table), and deletes it.
fn take_from(
    local: &'static std::thread::LocalKey<RefCell<Option<(u64, OrigDstMap)>>>,
    id: u64,
    fd: &OwnedFd,
    key: &SockKey,
) -> Option<OrigDst> {
    local.with(|local| {
        let mut local = local.borrow_mut();
        if local.as_ref().is_none_or(|(have, _)| *have != id) {
            *local = Some((id, OrigDstTable::handle(fd)?));
        }
        let (_, map) = local.as_mut()?;
        let orig = map.get(key, 0).ok()?;
        let _ = map.remove(key);
        Some(orig)
    })
}

/// The kernel's per-CPU event counters, summed.
pub struct Counters {
    map: PerCpuArray<MapData, u64>,
}

impl Counters {
    pub(super) fn new(map: Named) -> Result<Self, EbpfError> {
        Ok(Self { map: typed(map)? })
    }

    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        (0..NUM_COUNTERS)
            .map(|i| {
                let total = self
                    .map
                    .get(&i, 0)
                    .map(|per_cpu| per_cpu.iter().sum())
                    .unwrap_or(0);
                (COUNTER_NAMES[i as usize], total)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_mapped() {
        let v4: IpAddr = "10.1.2.3".parse().unwrap();
        let mapped: IpAddr = "::ffff:10.1.2.3".parse().unwrap();
        assert_eq!(addr16(v4), addr16(mapped));
        assert_eq!(&addr16(v4)[10..], &[0xff, 0xff, 10, 1, 2, 3]);
        let v6: IpAddr = "fd00::1".parse().unwrap();
        assert_eq!(addr16(v6)[0], 0xfd);
    }

    #[test]
    fn cidr_prefix_lengths() {
        let k = cidr_key(7, &"10.0.0.0/8".parse().unwrap());
        assert_eq!(k.prefix_len(), 32 + 96 + 8);
        assert_eq!(k.data().pod_id, [0, 0, 0, 7]);
        let k = cidr_key(7, &"fd00::/16".parse().unwrap());
        assert_eq!(k.prefix_len(), 32 + 16);
    }
}
