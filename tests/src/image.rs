//! OCI images as archives that `ctr images import` (and `podman load`) take: no registry
//! and no daemon. One layer holds the given files and the shared libraries they link (read
//! with `ldd`); the layer, config, manifest and index are written here and addressed by
//! their SHA-256, with fixed timestamps, so the same files give the same image.
//! `cargo xtask image` builds the agent's; the runtime tests build a pause and an app image.

use std::{
    io::{Read, Write},
    path::{Path, PathBuf},
};

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// The agent's image, as containerd normalizes `agent:0.1.0` (what `deploy/` names).
pub const AGENT_IMAGE: &str = "docker.io/library/agent:0.1.0";

/// What goes into an image.
pub struct ImageSpec {
    /// The full reference (`docker.io/library/NAME:TAG`).
    pub name: String,
    /// (file on this machine, path in the image).
    pub files: Vec<(PathBuf, String)>,
    pub entrypoint: Vec<String>,
}

fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", crate::proto::hex(&Sha256::digest(bytes)))
}

/// The shared libraries `bin` loads, as absolute paths (the dynamic loader included);
/// none for a static binary.
fn libraries(bin: &Path) -> Vec<PathBuf> {
    let Ok(out) = std::process::Command::new("ldd").arg(bin).output() else {
        return Vec::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            // `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)` or `/lib64/ld-... (0x...)`
            let path = l.split("=>").last()?.split_whitespace().next()?;
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

fn header(size: u64, mode: u32, kind: tar::EntryType) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_size(size);
    h.set_mode(mode);
    h.set_mtime(0);
    h.set_uid(0);
    h.set_gid(0);
    h.set_entry_type(kind);
    h
}

fn add_file(tar: &mut tar::Builder<Vec<u8>>, src: &Path, dest: &str) -> Result<(), String> {
    let data = std::fs::read(src).map_err(|e| format!("read {}: {e}", src.display()))?;
    let mut h = header(data.len() as u64, 0o755, tar::EntryType::Regular);
    tar.append_data(&mut h, dest.trim_start_matches('/'), data.as_slice())
        .map_err(|e| e.to_string())
}

fn add_dir(tar: &mut tar::Builder<Vec<u8>>, dest: &str, mode: u32) -> Result<(), String> {
    let mut h = header(0, mode, tar::EntryType::Directory);
    let name = format!("{}/", dest.trim_start_matches('/'));
    tar.append_data(&mut h, name, std::io::empty())
        .map_err(|e| e.to_string())
}

/// Writes the image archive into `out_dir`; returns its path and manifest digest.
pub fn build(spec: &ImageSpec, out_dir: &Path) -> Result<(PathBuf, String), String> {
    let mut layer = tar::Builder::new(Vec::new());
    let mut libs = Vec::new();
    for (src, _) in &spec.files {
        if !src.exists() {
            return Err(format!(
                "{} is missing: build it first (`cargo build -p agent -p simnode --bins`)",
                src.display()
            ));
        }
        libs.extend(libraries(src));
    }
    libs.sort();
    libs.dedup();
    let mut dirs: Vec<String> = ["etc", "run", "tmp", "proc", "sys", "dev"]
        .iter()
        .map(|d| d.to_string())
        .collect();
    let parents = spec
        .files
        .iter()
        .map(|(_, d)| PathBuf::from(d))
        .chain(libs.iter().cloned());
    for p in parents {
        for a in p.ancestors().skip(1) {
            let a = a.to_string_lossy().trim_start_matches('/').to_string();
            if !a.is_empty() {
                dirs.push(a);
            }
        }
    }
    dirs.sort();
    dirs.dedup();
    for d in &dirs {
        add_dir(&mut layer, d, if d == "tmp" { 0o1777 } else { 0o755 })?;
    }
    // As in every base image: /var/run is /run (runtimes name pods' namespaces
    // /var/run/netns/..., and the manifests mount the host's /run/netns).
    add_dir(&mut layer, "var", 0o755)?;
    let mut h = header(0, 0o777, tar::EntryType::Symlink);
    layer
        .append_link(&mut h, "var/run", "../run")
        .map_err(|e| e.to_string())?;
    for (src, dest) in &spec.files {
        add_file(&mut layer, src, dest)?;
    }
    for lib in &libs {
        // ldd names the loader by its link; the layer needs the file itself there.
        let real = std::fs::canonicalize(lib).map_err(|e| format!("{}: {e}", lib.display()))?;
        add_file(&mut layer, &real, &lib.to_string_lossy())?;
    }
    let layer = layer.into_inner().map_err(|e| e.to_string())?;
    let diff_id = sha256(&layer);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&layer).map_err(|e| e.to_string())?;
    let layer_gz = gz.finish().map_err(|e| e.to_string())?;
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64",
        "os": "linux",
        "config": { "Entrypoint": spec.entrypoint, "Env": ["PATH=/:/bin"], "WorkingDir": "/" },
        "rootfs": { "type": "layers", "diff_ids": [diff_id] },
        "history": [{ "created_by": "simnode::image" }],
    }))
    .expect("JSON");
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": { "mediaType": "application/vnd.oci.image.config.v1+json",
                    "digest": sha256(&config), "size": config.len() },
        "layers": [{ "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                     "digest": sha256(&layer_gz), "size": layer_gz.len() }],
    }))
    .expect("JSON");
    let manifest_digest = sha256(&manifest);
    let tag = spec.name.rsplit(':').next().unwrap_or("latest");
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest, "size": manifest.len(),
            "annotations": { "io.containerd.image.name": spec.name,
                             "org.opencontainers.image.ref.name": tag },
        }],
    }))
    .expect("JSON");
    let mut archive = tar::Builder::new(Vec::new());
    let mut put = |name: &str, data: &[u8]| -> Result<(), String> {
        let mut h = header(data.len() as u64, 0o644, tar::EntryType::Regular);
        archive
            .append_data(&mut h, name, data)
            .map_err(|e| e.to_string())
    };
    put("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    put("index.json", &index)?;
    for blob in [&layer_gz, &config, &manifest] {
        let digest = sha256(blob);
        put(
            &format!("blobs/sha256/{}", &digest["sha256:".len()..]),
            blob,
        )?;
    }
    let bytes = archive.into_inner().map_err(|e| e.to_string())?;
    std::fs::create_dir_all(out_dir).map_err(|e| format!("{}: {e}", out_dir.display()))?;
    let file = spec
        .name
        .rsplit('/')
        .next()
        .unwrap_or("image")
        .replace(':', "-");
    let path = out_dir.join(format!("{file}.oci.tar"));
    std::fs::write(&path, bytes).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok((path, manifest_digest))
}

/// The agent's image: `/agent` and `/agent-cni` from `bin_dir`.
pub fn agent(bin_dir: &Path, out_dir: &Path) -> Result<(PathBuf, String), String> {
    let spec = ImageSpec {
        name: AGENT_IMAGE.into(),
        files: vec![
            (bin_dir.join("agent"), "/agent".into()),
            (bin_dir.join("agent-cni"), "/agent-cni".into()),
        ],
        entrypoint: vec!["/agent".into()],
    };
    build(&spec, out_dir)
}

/// Checks an archive as a runtime reads it: every blob matches its digest, the index names
/// `name` and its manifest, the manifest's config and layer are there, and the layer holds
/// each of `files` (paths in the image, without the leading `/`).
pub fn verify(archive: &Path, name: &str, files: &[&str]) -> Result<(), String> {
    let e = |e: std::io::Error| format!("{}: {e}", archive.display());
    let mut all = std::collections::BTreeMap::new();
    let mut tar = tar::Archive::new(std::fs::File::open(archive).map_err(e)?);
    for entry in tar.entries().map_err(e)? {
        let mut entry = entry.map_err(e)?;
        let path = entry.path().map_err(e)?.to_string_lossy().into_owned();
        let mut data = Vec::new();
        entry.read_to_end(&mut data).map_err(e)?;
        all.insert(path, data);
    }
    for (path, data) in &all {
        if let Some(hex) = path.strip_prefix("blobs/sha256/") {
            if sha256(data) != format!("sha256:{hex}") {
                return Err(format!("blob {path} does not match its digest"));
            }
        }
    }
    let blob = |digest: &str| -> Result<&Vec<u8>, String> {
        let hex = digest
            .strip_prefix("sha256:")
            .ok_or("digest without sha256:")?;
        all.get(&format!("blobs/sha256/{hex}"))
            .ok_or_else(|| format!("blob {digest} is missing"))
    };
    let json = |b: &[u8]| serde_json::from_slice::<Value>(b).map_err(|e| e.to_string());
    let index = json(all.get("index.json").ok_or("no index.json")?)?;
    let m = &index["manifests"][0];
    if m["annotations"]["io.containerd.image.name"] != name {
        return Err(format!("the index does not name {name}"));
    }
    let manifest = json(blob(m["digest"].as_str().unwrap_or(""))?)?;
    let config = json(blob(manifest["config"]["digest"].as_str().unwrap_or(""))?)?;
    let layer_gz = blob(manifest["layers"][0]["digest"].as_str().unwrap_or(""))?;
    let mut layer = Vec::new();
    flate2::read::GzDecoder::new(layer_gz.as_slice())
        .read_to_end(&mut layer)
        .map_err(e)?;
    if config["rootfs"]["diff_ids"][0] != sha256(&layer) {
        return Err("the config's diff_id is not the layer's digest".into());
    }
    let mut names = Vec::new();
    for entry in tar::Archive::new(layer.as_slice()).entries().map_err(e)? {
        names.push(
            entry
                .map_err(e)?
                .path()
                .map_err(e)?
                .to_string_lossy()
                .into_owned(),
        );
    }
    for want in files {
        if !names.iter().any(|n| n == want) {
            return Err(format!("the layer has no /{want}"));
        }
    }
    Ok(())
}
