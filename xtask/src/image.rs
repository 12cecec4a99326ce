//! `cargo xtask image`: the agent's OCI image as an archive that `ctr images import` (and
//! `podman load`) take: no registry and no daemon. One layer holds `/agent`, `/agent-cni`
//! and the shared libraries they link (read with `ldd`); the layer, config, manifest and
//! index are written here and addressed by their SHA-256, with fixed timestamps so the
//! same binaries give the same image.

use std::{
    io::{Read, Write},
    path::{Path, PathBuf},
};

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// The image's name, as containerd normalizes `agent:0.1.0` (what `deploy/` refers to).
pub const NAME: &str = "docker.io/library/agent:0.1.0";
const TAG: &str = "0.1.0";
const BINARIES: [&str; 2] = ["agent", "agent-cni"];

fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", simnode::proto::hex(&Sha256::digest(bytes)))
}

/// The shared libraries `bin` loads, as absolute paths (the dynamic loader included).
fn libraries(bin: &Path) -> Result<Vec<PathBuf>> {
    let out = std::process::Command::new("ldd")
        .arg(bin)
        .output()
        .context("run ldd")?;
    ensure!(out.status.success(), "ldd {} failed", bin.display());
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .lines()
        .filter_map(|l| {
            // `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)` or `/lib64/ld-linux... (0x...)`
            let path = l.split("=>").last()?.split_whitespace().next()?;
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect())
}

/// Adds `src` at `dest` in the layer, with a fixed owner and time.
fn add_file(tar: &mut tar::Builder<Vec<u8>>, src: &Path, dest: &str) -> Result<()> {
    let data = std::fs::read(src).with_context(|| format!("read {}", src.display()))?;
    let mut h = tar::Header::new_gnu();
    h.set_size(data.len() as u64);
    h.set_mode(0o755);
    h.set_mtime(0);
    h.set_uid(0);
    h.set_gid(0);
    h.set_entry_type(tar::EntryType::Regular);
    tar.append_data(&mut h, dest.trim_start_matches('/'), data.as_slice())?;
    Ok(())
}

fn add_dir(tar: &mut tar::Builder<Vec<u8>>, dest: &str, mode: u32) -> Result<()> {
    let mut h = tar::Header::new_gnu();
    h.set_size(0);
    h.set_mode(mode);
    h.set_mtime(0);
    h.set_entry_type(tar::EntryType::Directory);
    tar.append_data(
        &mut h,
        format!("{}/", dest.trim_start_matches('/')),
        std::io::empty(),
    )?;
    Ok(())
}

/// Builds the archive from the binaries in `bin_dir`; returns its path and manifest
/// digest.
pub fn build(bin_dir: &Path, out_dir: &Path) -> Result<(PathBuf, String)> {
    let mut layer = tar::Builder::new(Vec::new());
    for dir in ["etc", "run", "tmp"] {
        add_dir(&mut layer, dir, if dir == "tmp" { 0o1777 } else { 0o755 })?;
    }
    let mut libs = Vec::new();
    for bin in BINARIES {
        let path = bin_dir.join(bin);
        ensure!(
            path.exists(),
            "{} is missing: build it first (`cargo build -p agent --bins`)",
            path.display()
        );
        add_file(&mut layer, &path, bin)?;
        libs.extend(libraries(&path)?);
    }
    libs.sort();
    libs.dedup();
    let mut dirs: Vec<PathBuf> = libs
        .iter()
        .flat_map(|l| {
            l.ancestors()
                .skip(1)
                .map(Path::to_path_buf)
                .collect::<Vec<_>>()
        })
        .filter(|d| d != Path::new("/"))
        .collect();
    dirs.sort();
    dirs.dedup();
    for d in &dirs {
        add_dir(&mut layer, &d.to_string_lossy(), 0o755)?;
    }
    for lib in &libs {
        // ldd names the loader by its link; the layer needs the file itself there.
        let real = std::fs::canonicalize(lib)?;
        add_file(&mut layer, &real, &lib.to_string_lossy())?;
    }
    let layer = layer.into_inner()?;
    let diff_id = sha256(&layer);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&layer)?;
    let layer_gz = gz.finish()?;
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64",
        "os": "linux",
        "config": { "Entrypoint": ["/agent"], "Env": ["PATH=/"], "WorkingDir": "/" },
        "rootfs": { "type": "layers", "diff_ids": [diff_id] },
        "history": [{ "created_by": "cargo xtask image" }],
    }))?;
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": { "mediaType": "application/vnd.oci.image.config.v1+json",
                    "digest": sha256(&config), "size": config.len() },
        "layers": [{ "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                     "digest": sha256(&layer_gz), "size": layer_gz.len() }],
    }))?;
    let manifest_digest = sha256(&manifest);
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest, "size": manifest.len(),
            "annotations": { "io.containerd.image.name": NAME,
                             "org.opencontainers.image.ref.name": TAG },
        }],
    }))?;
    let mut archive = tar::Builder::new(Vec::new());
    let mut put = |name: &str, data: &[u8]| -> Result<()> {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(0);
        h.set_entry_type(tar::EntryType::Regular);
        archive.append_data(&mut h, name, data)?;
        Ok(())
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
    let bytes = archive.into_inner()?;
    std::fs::create_dir_all(out_dir)?;
    let path = out_dir.join(format!("agent-{TAG}.oci.tar"));
    std::fs::write(&path, bytes)?;
    Ok((path, manifest_digest))
}

/// Checks an archive as a runtime would read it: every blob matches its digest, the
/// index names the image and its manifest, the manifest's config and layer are there, and
/// the layer holds both binaries and their dynamic loader.
pub fn verify(archive: &Path) -> Result<()> {
    let mut files = std::collections::BTreeMap::new();
    let mut tar = tar::Archive::new(std::fs::File::open(archive)?);
    for entry in tar.entries()? {
        let mut entry = entry?;
        let name = entry.path()?.to_string_lossy().into_owned();
        let mut data = Vec::new();
        entry.read_to_end(&mut data)?;
        files.insert(name, data);
    }
    for (name, data) in &files {
        if let Some(hex) = name.strip_prefix("blobs/sha256/") {
            ensure!(
                sha256(data) == format!("sha256:{hex}"),
                "blob {name} does not match its digest"
            );
        }
    }
    let blob = |digest: &str| -> Result<&Vec<u8>> {
        let hex = digest
            .strip_prefix("sha256:")
            .context("digest without sha256:")?;
        files
            .get(&format!("blobs/sha256/{hex}"))
            .with_context(|| format!("blob {digest} is missing"))
    };
    let index: Value = serde_json::from_slice(files.get("index.json").context("no index.json")?)?;
    let m = &index["manifests"][0];
    ensure!(
        m["annotations"]["io.containerd.image.name"] == NAME,
        "index does not name {NAME}"
    );
    let manifest: Value = serde_json::from_slice(blob(m["digest"].as_str().unwrap_or(""))?)?;
    let config: Value =
        serde_json::from_slice(blob(manifest["config"]["digest"].as_str().unwrap_or(""))?)?;
    let layer_gz = blob(manifest["layers"][0]["digest"].as_str().unwrap_or(""))?;
    let mut layer = Vec::new();
    flate2::read::GzDecoder::new(layer_gz.as_slice()).read_to_end(&mut layer)?;
    ensure!(
        config["rootfs"]["diff_ids"][0] == sha256(&layer),
        "the config's diff_id is not the layer's digest"
    );
    let mut names = Vec::new();
    for e in tar::Archive::new(layer.as_slice()).entries()? {
        names.push(e?.path()?.to_string_lossy().into_owned());
    }
    for want in ["agent", "agent-cni", "lib64/ld-linux-x86-64.so.2"] {
        if !names.iter().any(|n| n == want) {
            bail!("the layer has no /{want}");
        }
    }
    Ok(())
}
