//! What the guest boots into: an initramfs per kernel (static busybox, the modules that
//! reach the host's root over virtio-9p, an `/init` that mounts it read-only under a tmpfs
//! overlay and switches to it), and per run a job appended as a second cpio archive.

use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

use super::kernel::Kernel;

/// Modules the first stage loads (with what they depend on), in this order: virtio
/// transport, entropy (the agent's TLS keys), the host's root over 9p, the overlay on top,
/// and what the simulated node is made of.
const MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_rng",
    "9pnet_virtio",
    "9p",
    "overlay",
    "veth",
    "bridge",
];

/// The mount tag of the host's root.
pub const HOST_TAG: &str = "hostroot";

/// Lines the guest prints on its console, which the runner reads.
pub const BOOTED: &str = "VMTEST-BOOT";
pub const STARTED: &str = "VMTEST-START";
pub const BIN: &str = "VMTEST-BIN ";
pub const BIN_EXIT: &str = "VMTEST-BIN-EXIT ";
pub const EXIT: &str = "VMTEST-EXIT=";

/// Builds `dir/initramfs.cpio` for `kernel`, every run (a second or so): a cached one would
/// outlive a change to the first stage.
pub fn initramfs(kernel: &Kernel, dir: &Path) -> Result<PathBuf> {
    let out = dir.join("initramfs.cpio");
    let stage = dir.join("initramfs");
    if stage.exists() {
        fs::remove_dir_all(&stage)?;
    }
    for d in ["bin", "mod", "dev", "proc", "sys", "host", "ovl", "newroot"] {
        fs::create_dir_all(stage.join(d))?;
    }
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .context("no busybox: `cargo xtask setup` installs busybox-static")?;
    fs::copy(busybox, stage.join("bin/busybox"))?;
    let order = modules(kernel, &stage.join("mod"))?;
    fs::write(stage.join("modules"), order.join("\n") + "\n")?;
    let init = INIT
        .replace("@TAG@", HOST_TAG)
        .replace("@RELEASE@", &kernel.release)
        .replace("@MODULES@", &kernel.modules.display().to_string())
        .replace("@BOOTED@", BOOTED)
        .replace("@EXIT@", EXIT);
    write_executable(&stage.join("init"), &init)?;
    cpio(&stage, &out)?;
    Ok(out)
}

/// The first stage, run by the kernel as PID 1 from the initramfs.
const INIT: &str = r#"#!/bin/busybox sh
export PATH=/bin
/bin/busybox mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
fail() { echo "VMTEST-BOOT-FAILED: $*"; echo "@EXIT@99"; /bin/busybox poweroff -f; }
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
echo "@BOOTED@ $(/bin/busybox uname -r)"
for m in $(/bin/busybox cat /modules); do
  /bin/busybox insmod "/mod/$m" || fail "insmod $m"
done
/bin/busybox mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose @TAG@ /host || fail "mounting the host's root over 9p"
/bin/busybox mount -t tmpfs -o mode=0755 tmpfs /ovl || fail "tmpfs"
/bin/busybox mkdir -p /ovl/upper /ovl/work
/bin/busybox mount -t overlay overlay -o lowerdir=/host,upperdir=/ovl/upper,workdir=/ovl/work /newroot || fail "overlay"
# The kernel's request_module() runs /sbin/modprobe in PID 1's root: give it this kernel's
# modules there, so iptables' nf_tables and the like load on demand.
/bin/busybox mkdir -p "/newroot/lib/modules/@RELEASE@"
/bin/busybox mount --bind "/newroot@MODULES@" "/newroot/lib/modules/@RELEASE@" || fail "binding the modules"
/bin/busybox cp /job.sh /newroot/vmjob.sh || fail "no job appended to the initramfs"
/bin/busybox mount --move /dev /newroot/dev
/bin/busybox mount --move /proc /newroot/proc
/bin/busybox mount --move /sys /newroot/sys
exec /bin/busybox switch_root /newroot /bin/busybox sh /vmjob.sh
fail "switch_root"
"#;

/// The modules in load order (dependencies first), decompressed into `into` as plain `.ko`
/// (busybox's insmod reads no `.ko.xz`); built-ins are skipped.
fn modules(kernel: &Kernel, into: &Path) -> Result<Vec<String>> {
    let mut order: Vec<String> = Vec::new();
    for m in MODULES {
        let out = crate::sh::output(
            "modprobe",
            &[
                "--show-depends",
                "-S",
                &kernel.release,
                "-d",
                &kernel.root.to_string_lossy(),
                m,
            ],
        )
        .with_context(|| format!("module {m} of {}", kernel.release))?;
        for line in out.lines() {
            let Some(path) = line.strip_prefix("insmod ") else {
                continue; // builtin
            };
            let path = Path::new(path.split_whitespace().next().unwrap_or_default());
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let plain = name
                .trim_end_matches(".xz")
                .trim_end_matches(".zst")
                .to_string();
            if order.contains(&plain) {
                continue;
            }
            if name.ends_with(".xz") {
                let bytes = Command::new("xz")
                    .args(["-dc"])
                    .arg(path)
                    .output()
                    .context("xz (xz-utils, which `cargo xtask setup` installs)")?;
                if !bytes.status.success() {
                    bail!("xz -dc {} failed", path.display());
                }
                fs::write(into.join(&plain), bytes.stdout)?;
            } else {
                fs::copy(path, into.join(&plain))
                    .with_context(|| format!("copying {}", path.display()))?;
            }
            order.push(plain);
        }
    }
    Ok(order)
}

/// What one run does inside the guest.
pub struct Job<'a> {
    /// Test binaries (host paths), each run in turn.
    pub binaries: &'a [(String, PathBuf)],
    /// Where cargo would run them (the tests package).
    pub cwd: &'a Path,
    /// Arguments for every binary (a test name filter, say).
    pub args: &'a [String],
    /// Environment for every binary.
    pub env: &'a [(String, String)],
}

/// Writes the job as a cpio archive with `/job.sh`, appended after `base` into `out` (the
/// kernel unpacks concatenated archives in order).
pub fn with_job(base: &Path, job: &Job<'_>, dir: &Path, out: &Path) -> Result<()> {
    let stage = dir.join("job");
    if stage.exists() {
        fs::remove_dir_all(&stage)?;
    }
    fs::create_dir_all(&stage)?;
    write_executable(&stage.join("job.sh"), &job_script(job))?;
    let archive = dir.join("job.cpio");
    cpio(&stage, &archive)?;
    let mut all = fs::read(base)?;
    all.extend(fs::read(&archive)?);
    fs::write(out, all)?;
    Ok(())
}

/// The second stage, run as PID 1 in the overlay by the host's busybox.
fn job_script(job: &Job<'_>) -> String {
    let mut s = JOB_HEAD.replace("@EXIT@", EXIT);
    for (k, v) in job.env {
        s.push_str(&format!("export {k}={}\n", quote(v)));
    }
    s.push_str(&format!(
        "cd {} || fail cwd\n",
        quote(&job.cwd.display().to_string())
    ));
    s.push_str(&format!("echo {STARTED}\nrc=0\n"));
    let args: Vec<String> = job.args.iter().map(|a| quote(a)).collect();
    for (name, path) in job.binaries {
        s.push_str(&format!(
            "echo '{BIN}{name}'\n{} --test-threads=1 --color never {} 2>&1\nr=$?\necho \"{BIN_EXIT}{name} $r\"\n[ $r -eq 0 ] || rc=1\n",
            quote(&path.display().to_string()),
            args.join(" ")
        ));
    }
    s.push_str(&format!(
        "echo \"{EXIT}$rc\"\nsync\n/bin/busybox poweroff -f\n"
    ));
    s
}

const JOB_HEAD: &str = r#"
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
fail() { echo "VMTEST-BOOT-FAILED: $*"; echo "@EXIT@99"; /bin/busybox poweroff -f; }
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t cgroup2 cgroup2 /sys/fs/cgroup || fail "cgroup2"
mount -t bpf bpf /sys/fs/bpf || fail "bpffs"
mount -t debugfs debugfs /sys/kernel/debug
# /tmp stays the overlay's (writes land in its tmpfs): a checkout or target directory under
# the host's /tmp must stay visible.
mount -t tmpfs tmpfs /run
ip link set lo up
ulimit -n 65536
"#;

fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

fn write_executable(path: &Path, text: &str) -> Result<()> {
    fs::write(path, text)?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o755))?;
    Ok(())
}

/// `find . | cpio -o -H newc` in `stage`.
fn cpio(stage: &Path, out: &Path) -> Result<()> {
    let status = Command::new("sh")
        .args(["-c", "find . | cpio -o -H newc --quiet"])
        .current_dir(stage)
        .stdout(fs::File::create(out)?)
        .status()
        .context("cpio (which `cargo xtask setup` installs)")?;
    if !status.success() {
        bail!("cpio failed for {}", stage.display());
    }
    Ok(())
}
