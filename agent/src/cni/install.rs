//! `agent cni install | uninstall`: put `agent-cni` on a node the way CNI node agents do.
//! The plugin binary is copied next to the other plugins, and our entry is appended to
//! the plugin list of the node's primary network (the conflist the runtime uses: the
//! first in name order), never replacing any of it. Uninstall removes exactly what
//! install added. Files are replaced atomically (written aside, then renamed).

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

/// The plugin's `type`, and the binary's name in the CNI bin directory.
pub const PLUGIN: &str = "agent-cni";

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Conf { path: PathBuf, reason: String },
    #[error("no network configuration (*.conflist) in {0}: install the pod network first; agent-cni chains after it")]
    NoNetwork(PathBuf),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> InstallError + '_ {
    move |source| InstallError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The network configuration the runtime uses: the first `*.conflist`/`*.conf`/`*.json`
/// in name order (as containerd and the kubelet choose). Only a conflist can be chained.
pub fn primary_conf(conf_dir: &Path) -> Result<PathBuf, InstallError> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(conf_dir)
        .map_err(io(conf_dir))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.extension()
                .is_some_and(|e| e == "conflist" || e == "conf" || e == "json")
        })
        .collect();
    files.sort();
    let first = files
        .into_iter()
        .next()
        .ok_or_else(|| InstallError::NoNetwork(conf_dir.to_path_buf()))?;
    if first.extension().is_some_and(|e| e != "conflist") {
        return Err(InstallError::Conf {
            path: first,
            reason: "a single-plugin network configuration cannot be chained: write it as a .conflist (its plugin as the one element of \"plugins\")".into(),
        });
    }
    Ok(first)
}

fn read_conf(path: &Path) -> Result<Value, InstallError> {
    let text = std::fs::read_to_string(path).map_err(io(path))?;
    let v: Value = serde_json::from_str(&text).map_err(|e| InstallError::Conf {
        path: path.to_path_buf(),
        reason: format!("not JSON: {e}"),
    })?;
    if !v["plugins"].is_array() {
        return Err(InstallError::Conf {
            path: path.to_path_buf(),
            reason: "no \"plugins\" list".into(),
        });
    }
    Ok(v)
}

/// Writes `data` to `path` through a temporary file in the same directory.
fn replace(path: &Path, data: &[u8], mode: u32) -> Result<(), InstallError> {
    use std::os::unix::fs::PermissionsExt;
    let tmp = path.with_extension("agent-tmp");
    std::fs::write(&tmp, data).map_err(io(&tmp))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode)).map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

fn is_ours(p: &Value) -> bool {
    p["type"] == PLUGIN
}

/// Copies the plugin binary to `bin_dir` and appends (or updates) our entry at the end
/// of the primary conflist in `conf_dir`. Idempotent. Returns the conflist changed.
pub fn install(
    plugin: &Path,
    bin_dir: &Path,
    conf_dir: &Path,
    agent_socket: &Path,
) -> Result<PathBuf, InstallError> {
    let bytes = std::fs::read(plugin).map_err(io(plugin))?;
    std::fs::create_dir_all(bin_dir).map_err(io(bin_dir))?;
    replace(&bin_dir.join(PLUGIN), &bytes, 0o755)?;
    let path = primary_conf(conf_dir)?;
    let mut conf = read_conf(&path)?;
    let plugins = conf["plugins"]
        .as_array_mut()
        .expect("checked by read_conf");
    plugins.retain(|p| !is_ours(p));
    plugins.push(json!({ "type": PLUGIN, "agentSocket": agent_socket }));
    let text = serde_json::to_string_pretty(&conf).expect("JSON serializes");
    replace(&path, text.as_bytes(), 0o644)?;
    Ok(path)
}

/// Removes our entry from every conflist in `conf_dir` and the binary from `bin_dir`.
/// Returns the conflists changed. Idempotent.
pub fn uninstall(bin_dir: &Path, conf_dir: &Path) -> Result<Vec<PathBuf>, InstallError> {
    let mut changed = Vec::new();
    let entries = match std::fs::read_dir(conf_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(changed),
        Err(e) => return Err(io(conf_dir)(e)),
    };
    for path in entries.flatten().map(|e| e.path()) {
        if path.extension().is_none_or(|e| e != "conflist") {
            continue;
        }
        let mut conf = read_conf(&path)?;
        let plugins = conf["plugins"]
            .as_array_mut()
            .expect("checked by read_conf");
        let before = plugins.len();
        plugins.retain(|p| !is_ours(p));
        if plugins.len() != before {
            let text = serde_json::to_string_pretty(&conf).expect("JSON serializes");
            replace(&path, text.as_bytes(), 0o644)?;
            changed.push(path);
        }
    }
    let bin = bin_dir.join(PLUGIN);
    match std::fs::remove_file(&bin) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(&bin)(e)),
    }
    Ok(changed)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BRIDGE: &str = r#"{
  "cniVersion": "1.0.0",
  "name": "pods",
  "plugins": [
    { "type": "bridge", "bridge": "cni0", "ipam": { "type": "host-local", "subnet": "10.22.0.0/16" } },
    { "type": "portmap", "capabilities": { "portMappings": true } }
  ]
}"#;

    fn dirs(tag: &str) -> (PathBuf, PathBuf, PathBuf) {
        let root = std::env::temp_dir().join(format!("cni-install-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let (bin, conf) = (root.join("bin"), root.join("net.d"));
        std::fs::create_dir_all(&conf).unwrap();
        let plugin = root.join("agent-cni-built");
        std::fs::write(&plugin, b"#!/bin/true\n").unwrap();
        (root, bin, conf)
    }

    #[test]
    fn install_appends_once_and_uninstall_removes_exactly_it() {
        let (root, bin, conf) = dirs("roundtrip");
        std::fs::write(conf.join("10-pods.conflist"), BRIDGE).unwrap();
        std::fs::write(conf.join("99-other.conflist"), BRIDGE).unwrap();
        let plugin = root.join("agent-cni-built");
        let socket = Path::new("/run/agent/admin.sock");
        let changed = install(&plugin, &bin, &conf, socket).unwrap();
        assert_eq!(
            changed,
            conf.join("10-pods.conflist"),
            "the first network is the one used"
        );
        install(&plugin, &bin, &conf, socket).unwrap();
        let v = read_conf(&changed).unwrap();
        let types: Vec<&str> = v["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["type"].as_str().unwrap())
            .collect();
        assert_eq!(
            types,
            ["bridge", "portmap", "agent-cni"],
            "ours is last, once"
        );
        assert!(bin.join(PLUGIN).exists());
        let other = read_conf(&conf.join("99-other.conflist")).unwrap();
        assert_eq!(
            other,
            serde_json::from_str::<Value>(BRIDGE).unwrap(),
            "untouched"
        );
        assert_eq!(uninstall(&bin, &conf).unwrap(), vec![changed.clone()]);
        assert_eq!(
            read_conf(&changed).unwrap(),
            serde_json::from_str::<Value>(BRIDGE).unwrap(),
            "uninstall leaves the network as it was"
        );
        assert!(!bin.join(PLUGIN).exists());
        assert!(uninstall(&bin, &conf).unwrap().is_empty(), "idempotent");
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn no_network_or_a_single_plugin_conf_is_an_error() {
        let (root, bin, conf) = dirs("errors");
        let plugin = root.join("agent-cni-built");
        let socket = Path::new("/run/agent/admin.sock");
        let err = install(&plugin, &bin, &conf, socket)
            .unwrap_err()
            .to_string();
        assert!(err.contains("install the pod network first"), "{err}");
        std::fs::write(
            conf.join("10-bridge.conf"),
            r#"{"cniVersion":"1.0.0","type":"bridge"}"#,
        )
        .unwrap();
        let err = install(&plugin, &bin, &conf, socket)
            .unwrap_err()
            .to_string();
        assert!(err.contains("cannot be chained"), "{err}");
        let _ = std::fs::remove_dir_all(&root);
    }
}
