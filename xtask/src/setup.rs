//! `cargo xtask setup`: installs what building and testing need, idempotently, or stops with
//! one sentence saying what to do.

use std::{path::Path, process::Command};

use anyhow::{bail, Context, Result};

use crate::sh;

/// The kernel features used (bpf_link for cgroups, netns cookies in sock_addr and
/// SO_NETNS_COOKIE) are all present from 5.15 on.
const MIN_KERNEL: (u32, u32) = (5, 15);
/// Debian's Rust toolchain that ships the `core` sources (for -Z build-std).
const RUST_PACKAGES: &[&str] = &["rustc-web", "cargo-web", "rust-web-src"];
/// Runtime and test tools.
const TOOL_PACKAGES: &[&str] = &[
    "bpftool",
    "iproute2",
    "zlib1g-dev",
    "libzstd-dev",
    "openssl",
    // The bench's reference arms: an iptables REDIRECT in the pod, and haproxy doing mTLS.
    "iptables",
    "haproxy",
    // A real container runtime for the deployment tests: containerd (its CRI plugin), runc,
    // the reference CNI plugins, protoc for the CRI client, and busybox as a test image.
    "containerd",
    "runc",
    "containernetworking-plugins",
    "protobuf-compiler",
    "busybox-static",
    // `cargo xtask vm`: qemu boots other kernels (unpacked with dpkg, modules indexed by
    // kmod's depmod) from an initramfs that cpio packs around busybox.
    "qemu-system-x86",
    "cpio",
    "kmod",
    "xz-utils",
];
pub const EBPF_TOOLCHAIN: &str = "bpf-debian";
const BPF_LINKER_VERSION: &str = "0.13.0";

pub fn run() -> Result<()> {
    preflight()?;
    let mut apt_updated = false;
    apt_install(RUST_PACKAGES, &mut apt_updated)?;
    let llvm = debian_llvm_major()?;
    let llvm_pkgs = [format!("llvm-{llvm}-dev"), format!("libpolly-{llvm}-dev")];
    let llvm_refs: Vec<&str> = llvm_pkgs.iter().map(String::as_str).collect();
    apt_install(&llvm_refs, &mut apt_updated)?;
    apt_install(TOOL_PACKAGES, &mut apt_updated)?;
    bpf_linker(llvm)?;
    cargo_fuzz()?;
    link_toolchain()?;
    mount_bpffs()?;
    println!("setup: ready (Debian rustc with LLVM {llvm}, bpf-linker, toolchain `{EBPF_TOOLCHAIN}`, bpffs)");
    Ok(())
}

fn preflight() -> Result<()> {
    if !nix_is_root() {
        bail!("setup needs root (it installs packages and loads eBPF programs): run it as root, e.g. `sudo -E cargo xtask test`");
    }
    let os = std::fs::read_to_string("/etc/os-release").unwrap_or_default();
    let debian_like = os.lines().any(|l| {
        (l.starts_with("ID=") || l.starts_with("ID_LIKE="))
            && (l.contains("debian") || l.contains("ubuntu"))
    });
    if !debian_like {
        bail!("setup supports Debian and Ubuntu only (apt); on another distribution install rustc with rust-src, bpf-linker, bpftool and iproute2 yourself");
    }
    let release = sh::output("uname", &["-r"])?;
    let mut parts = release
        .trim()
        .split(['.', '-'])
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let version = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    if version < MIN_KERNEL {
        bail!(
            "kernel {} is too old: the agent needs Linux >= {}.{} (cgroup BPF links, netns cookies)",
            release.trim(),
            MIN_KERNEL.0,
            MIN_KERNEL.1
        );
    }
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    if !mountinfo.lines().any(|l| l.contains(" - cgroup2 ")) {
        bail!("no cgroup v2 hierarchy is mounted: boot with systemd.unified_cgroup_hierarchy=1 or mount one (`mount -t cgroup2 none /sys/fs/cgroup/unified`)");
    }
    Ok(())
}

fn nix_is_root() -> bool {
    sh::output("id", &["-u"])
        .map(|s| s.trim() == "0")
        .unwrap_or(false)
}

fn installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

fn apt_install(pkgs: &[&str], updated: &mut bool) -> Result<()> {
    let missing: Vec<&str> = pkgs.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    println!("setup: installing {}", missing.join(" "));
    if !*updated {
        sh::run_env(
            "apt-get",
            &["update", "-qq"],
            &[("DEBIAN_FRONTEND", "noninteractive")],
        )
        .context("apt-get update failed: check the network and /etc/apt/sources.list")?;
        *updated = true;
    }
    let mut args = vec!["install", "-y", "-qq", "--no-install-recommends"];
    args.extend(&missing);
    sh::run_env("apt-get", &args, &[("DEBIAN_FRONTEND", "noninteractive")]).with_context(|| {
        format!(
            "apt-get could not install {}: this needs Debian 12 (bookworm) or newer, or an Ubuntu with the same packages",
            missing.join(" ")
        )
    })
}

/// cargo-fuzz, for `cargo xtask fuzz` (and the test command's bounded fuzzing).
fn cargo_fuzz() -> Result<()> {
    let installed = Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if installed {
        return Ok(());
    }
    println!("setup: installing cargo-fuzz {CARGO_FUZZ_VERSION} from crates.io (about a minute)");
    sh::run(
        "cargo",
        &[
            "install",
            "--locked",
            "cargo-fuzz",
            "--version",
            CARGO_FUZZ_VERSION,
        ],
    )
    .context("installing cargo-fuzz failed (output above); is crates.io reachable?")
}

const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// The LLVM major version Debian's rustc was built with; bpf-linker must match it.
fn debian_llvm_major() -> Result<u32> {
    let vv = sh::output("/usr/bin/rustc", &["-vV"])
        .context("Debian's rustc (/usr/bin/rustc) does not run")?;
    vv.lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next()?.parse().ok())
        .context("cannot read the LLVM version from `/usr/bin/rustc -vV`")
}

fn bpf_linker(llvm: u32) -> Result<()> {
    if Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        return Ok(());
    }
    println!(
        "setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM {llvm} (about a minute)"
    );
    let prefix = format!("/usr/lib/llvm-{llvm}");
    let feature = format!("llvm-{llvm}");
    sh::run_env(
        "cargo",
        &[
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--locked",
            "--no-default-features",
            "--features",
            &feature,
        ],
        &[("LLVM_PREFIX", prefix.as_str())],
    )
    .with_context(|| {
        format!("building bpf-linker against {prefix} failed; is llvm-{llvm}-dev installed?")
    })?;
    if Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_err()
    {
        bail!("bpf-linker was installed but is not on PATH: add ~/.cargo/bin to PATH");
    }
    Ok(())
}

/// aya-build runs `rustup run <toolchain> cargo build`; register Debian's compiler there.
fn link_toolchain() -> Result<()> {
    if Command::new("rustup").arg("--version").output().is_err() {
        // Without rustup, aya-build uses whatever cargo/rustc are on PATH.
        println!("setup: rustup not found; the eBPF build will use the rustc on PATH");
        return Ok(());
    }
    let works = Command::new("rustup")
        .args(["run", EBPF_TOOLCHAIN, "rustc", "--print", "sysroot"])
        .output()
        .map(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).trim() == "/usr")
        .unwrap_or(false);
    if !works {
        sh::run("rustup", &["toolchain", "link", EBPF_TOOLCHAIN, "/usr"])
            .context("cannot link Debian's rustc into rustup")?;
    }
    Ok(())
}

fn mount_bpffs() -> Result<()> {
    let path = Path::new("/sys/fs/bpf");
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mounted = mountinfo
        .lines()
        .any(|l| l.split_whitespace().nth(4) == Some("/sys/fs/bpf") && l.contains(" - bpf "));
    if !mounted {
        if !path.is_dir() {
            bail!("/sys/fs/bpf does not exist: is sysfs mounted?");
        }
        sh::run("mount", &["-t", "bpf", "bpf", "/sys/fs/bpf"])
            .context("cannot mount bpffs on /sys/fs/bpf")?;
    }
    Ok(())
}
