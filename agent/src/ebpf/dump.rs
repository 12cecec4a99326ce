//! The maps an operator inspects (`agent maps`, the admin API), pinned under
//! `<pin_root>/maps/` and decoded from the pins, so the same view works whether the
//! daemon is running or not (a stopped agent's fail-closed pods keep their maps alive).

use std::path::Path;

use agent_common::{
    InboundPod, OrigDst, PodConfig, SockKey, COUNTER_NAMES, MAP_COUNTERS, MAP_ORIG_DST,
    MAP_POD_ADDRS, MAP_POD_CONFIG, POD_FLAG_BLOCK, POD_FLAG_FAIL_OPEN,
};
use aya::{
    maps::{HashMap, Map, MapData, PerCpuArray},
    Ebpf,
};
use serde_json::{json, Value};

use super::EbpfError;

use crate::types::PIN_MAPS_DIR as MAPS_DIR;
const PINNED: [&str; 4] = [MAP_POD_CONFIG, MAP_POD_ADDRS, MAP_ORIG_DST, MAP_COUNTERS];

pub(super) fn pin_maps(ebpf: &Ebpf, pin_root: &Path) -> Result<(), EbpfError> {
    let dir = pin_root.join(MAPS_DIR);
    super::links::ensure_bpffs(pin_root)?;
    std::fs::create_dir_all(&dir).map_err(super::io_err(&dir))?;
    for name in PINNED {
        let path = dir.join(name);
        // A previous agent's maps: its programs keep them alive; the pin now names ours.
        let _ = std::fs::remove_file(&path);
        let map = ebpf
            .map(name)
            .ok_or(EbpfError::Missing { kind: "map", name })?;
        map.pin(&path)
            .map_err(|source| EbpfError::Pin { path, source })?;
    }
    Ok(())
}

pub fn unpin_maps(pin_root: &Path) {
    let dir = pin_root.join(MAPS_DIR);
    for name in PINNED {
        let _ = std::fs::remove_file(dir.join(name));
    }
    let _ = std::fs::remove_dir(&dir);
    let _ = std::fs::remove_dir(pin_root);
}

fn open(pin_root: &Path, name: &str) -> Result<Map, String> {
    let path = pin_root.join(MAPS_DIR).join(name);
    let data = MapData::from_pin(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    Map::from_map_data(data).map_err(|e| format!("{}: {e}", path.display()))
}

fn ip(addr: [u8; 16]) -> String {
    super::ip_from16(addr).to_string()
}

/// Decodes the pinned maps into JSON.
pub fn dump(pin_root: &Path) -> Result<Value, String> {
    let pods: HashMap<MapData, u64, PodConfig> = open(pin_root, MAP_POD_CONFIG)?
        .try_into()
        .map_err(|e| format!("{e}"))?;
    let pods: Vec<Value> = pods
        .iter()
        .filter_map(Result::ok)
        .map(|(cookie, c)| {
            json!({
                "netns_cookie": cookie, "pod_id": c.pod_id, "outbound_port": c.outbound_port,
                "fail_open": c.flags & POD_FLAG_FAIL_OPEN != 0,
                "blocked": c.flags & POD_FLAG_BLOCK != 0,
            })
        })
        .collect();
    let addrs: HashMap<MapData, [u8; 16], InboundPod> = open(pin_root, MAP_POD_ADDRS)?
        .try_into()
        .map_err(|e| format!("{e}"))?;
    let addrs: Vec<Value> = addrs
        .iter()
        .filter_map(Result::ok)
        .map(|(a, p)| json!({ "address": ip(a), "pod_id": p.pod_id }))
        .collect();
    let orig: HashMap<MapData, SockKey, OrigDst> = open(pin_root, MAP_ORIG_DST)?
        .try_into()
        .map_err(|e| format!("{e}"))?;
    let pending: Vec<Value> = orig
        .iter()
        .filter_map(Result::ok)
        .map(|(k, o)| {
            json!({
                "pod_id": k.pod_id, "client": format!("{}:{}", ip(k.addr), k.port),
                "original_destination": format!("{}:{}", ip(o.addr), o.port),
            })
        })
        .collect();
    let counters: PerCpuArray<MapData, u64> = open(pin_root, MAP_COUNTERS)?
        .try_into()
        .map_err(|e| format!("{e}"))?;
    let mut totals = serde_json::Map::new();
    for (i, name) in COUNTER_NAMES.iter().enumerate() {
        let v: u64 = counters
            .get(&(i as u32), 0)
            .map(|c| c.iter().sum())
            .unwrap_or(0);
        totals.insert((*name).to_string(), json!(v));
    }
    Ok(json!({
        MAP_POD_CONFIG: pods,
        MAP_POD_ADDRS: addrs,
        MAP_ORIG_DST: pending,
        MAP_COUNTERS: totals,
    }))
}
