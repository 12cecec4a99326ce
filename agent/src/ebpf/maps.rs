//! Typed handles to the kernel maps. Layouts come from `agent-common`.

use std::{net::IpAddr, sync::Mutex};

use agent_common::{
    v4_mapped, CidrKey, OrigDst, PodConfig, PortKey, SockKey, CIDR_KEY_POD_BITS, COUNTER_NAMES,
    NUM_COUNTERS,
};
use aya::maps::{
    lpm_trie::{Key, LpmTrie},
    HashMap, Map, MapData, MapError, PerCpuArray,
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

/// Per-pod state in the kernel: configuration and exclusions, plus the agent's cgroups.
pub struct PodTable {
    config: HashMap<MapData, u64, PodConfig>,
    ports: HashMap<MapData, PortKey, u32>,
    cidrs: LpmTrie<MapData, CidrKey, u32>,
    agent_cgroups: HashMap<MapData, u64, u32>,
}

impl PodTable {
    pub(super) fn new(
        config: Named,
        ports: Named,
        cidrs: Named,
        agent: Named,
    ) -> Result<Self, EbpfError> {
        Ok(Self {
            config: typed(config)?,
            ports: typed(ports)?,
            cidrs: typed(cidrs)?,
            agent_cgroups: typed(agent)?,
        })
    }

    pub fn exempt_agent_cgroup(&mut self, cgroup_id: u64) -> Result<(), EbpfError> {
        self.agent_cgroups
            .insert(cgroup_id, 1, 0)
            .map_err(map_err(agent_common::MAP_AGENT_CGROUPS))
    }

    pub fn set(&mut self, netns_cookie: u64, cfg: PodConfig) -> Result<(), EbpfError> {
        self.config
            .insert(netns_cookie, cfg, 0)
            .map_err(map_err(agent_common::MAP_POD_CONFIG))
    }

    pub fn exclude(
        &mut self,
        pod_id: u32,
        ports: &[u16],
        cidrs: &[IpNet],
    ) -> Result<(), EbpfError> {
        for port in ports {
            self.ports
                .insert(PortKey::new(pod_id, *port), 1, 0)
                .map_err(map_err(agent_common::MAP_EXCLUDED_PORTS))?;
        }
        for net in cidrs {
            self.cidrs
                .insert(&cidr_key(pod_id, net), 1, 0)
                .map_err(map_err(agent_common::MAP_EXCLUDED_CIDRS))?;
        }
        Ok(())
    }

    /// Forgets a pod entirely (its exclusions too).
    pub fn remove(&mut self, netns_cookie: u64, pod_id: u32, ports: &[u16], cidrs: &[IpNet]) {
        // Best effort: a missing entry is already what we want.
        let _ = self.config.remove(&netns_cookie);
        for port in ports {
            let _ = self.ports.remove(&PortKey::new(pod_id, *port));
        }
        for net in cidrs {
            let _ = self.cidrs.remove(&cidr_key(pod_id, net));
        }
    }
}

fn cidr_key(pod_id: u32, net: &IpNet) -> Key<CidrKey> {
    let (addr, bits) = match net {
        // IPv4 is stored mapped, so its prefix starts after the 96-bit ::ffff: part.
        IpNet::V4(v4) => (
            v4_mapped(v4.network().octets()),
            96 + u32::from(v4.prefix_len()),
        ),
        IpNet::V6(v6) => (v6.network().octets(), u32::from(v6.prefix_len())),
    };
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
pub struct OrigDstTable {
    map: Mutex<HashMap<MapData, SockKey, OrigDst>>,
}

impl OrigDstTable {
    pub(super) fn new(map: Named) -> Result<Self, EbpfError> {
        Ok(Self {
            map: Mutex::new(typed(map)?),
        })
    }

    /// Looks the entry up and deletes it: each redirected connection is accepted once, and
    /// the LRU map must not fill with entries nobody will read again.
    pub fn take(&self, key: &SockKey) -> Option<OrigDst> {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let orig = map.get(key, 0).ok()?;
        let _ = map.remove(key);
        Some(orig)
    }
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
