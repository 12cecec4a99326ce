//! A containerd of the test's own: its config, root, state and socket under the node's
//! scratch directory, the reference CNI plugins (and ours) in its CNI bin directory, so a
//! test never touches a system containerd. Dropping it removes every pod it ran, stops
//! it, and removes what it left (mounts, cgroups, directories).

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::sys::{run, run_quiet};

/// The sandbox ("pause") image every pod starts with.
pub const PAUSE_IMAGE: &str = "docker.io/library/simnode-pause:1";

pub struct Containerd {
    dir: PathBuf,
    pub socket: PathBuf,
    pub cni_bin: PathBuf,
    pub cni_conf: PathBuf,
    child: Option<Child>,
    log: PathBuf,
}

impl Containerd {
    /// Starts containerd with state under `dir`, and waits for its socket.
    pub fn start(dir: &Path) -> Containerd {
        let (root, state) = (dir.join("root"), dir.join("state"));
        let (cni_bin, cni_conf) = (dir.join("cni/bin"), dir.join("cni/net.d"));
        for d in [&root, &state, &cni_bin, &cni_conf] {
            std::fs::create_dir_all(d).unwrap_or_else(|e| panic!("mkdir {}: {e}", d.display()));
        }
        // The reference plugins (bridge, host-local, loopback, ...), where the runtime
        // looks; ours joins them as an installer would put it.
        for e in std::fs::read_dir("/usr/lib/cni")
            .expect("/usr/lib/cni (containernetworking-plugins; `cargo xtask setup`)")
            .flatten()
        {
            let _ = std::os::unix::fs::symlink(e.path(), cni_bin.join(e.file_name()));
        }
        let socket = dir.join("containerd.sock");
        let config = format!(
            r#"version = 2
root = "{root}"
state = "{state}"
[grpc]
  address = "{socket}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  # root here lacks CAP_SYS_RESOURCE: without this every sandbox fails to start.
  restrict_oom_score_adj = true
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{cni_bin}"
    conf_dir = "{cni_conf}"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
"#,
            root = root.display(),
            state = state.display(),
            socket = socket.display(),
            cni_bin = cni_bin.display(),
            cni_conf = cni_conf.display(),
        );
        let config_path = dir.join("config.toml");
        std::fs::write(&config_path, config).expect("write containerd config");
        let log = dir.join("containerd.log");
        let out = std::fs::File::create(&log).expect("containerd log");
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log fd"))
            .stderr(out)
            .spawn()
            .expect("start containerd (`cargo xtask setup` installs it)");
        let c = Containerd {
            dir: dir.to_path_buf(),
            socket,
            cni_bin,
            cni_conf,
            child: Some(child),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !c.socket.exists() {
            assert!(
                Instant::now() < deadline,
                "containerd did not start within 20 s:\n{}",
                c.log_tail()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        c
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// `ctr images import`: an OCI archive into the namespace the CRI plugin uses.
    pub fn import(&self, archive: &Path) {
        run(
            "ctr",
            &[
                "--address",
                &self.socket.to_string_lossy(),
                "-n",
                "k8s.io",
                "images",
                "import",
                &archive.to_string_lossy(),
            ],
        );
    }

    /// Writes the node's pod network (what the network's installer would).
    pub fn write_conflist(&self, name: &str, conf: &serde_json::Value) {
        let path = self.cni_conf.join(name);
        std::fs::write(&path, serde_json::to_vec_pretty(conf).expect("JSON"))
            .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // Pods first (the CRI client in `super` removes them), then the daemon.
        if let Ok(cri) = super::Cri::connect(&self.socket) {
            cri.remove_all_pods();
        }
        if let Some(mut child) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(10);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        // Whatever is still mounted below our root (snapshots of a container that did
        // not stop), deepest first.
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        let mut ours: Vec<&str> = mounts
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1))
            .filter(|m| Path::new(m).starts_with(&self.dir))
            .collect();
        ours.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in ours {
            run_quiet("umount", &["-l", m]);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
