//! Kernels to boot: Debian's generic `-amd64` images, fetched with a private apt state (the
//! machine's own apt configuration is untouched), unpacked with `dpkg -x`, their modules
//! indexed with `depmod`, cached under `target/vm/kernels/NAME`.

use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};

use crate::sh;

/// A kernel the default pass boots, by the Debian suite that carries it.
pub struct Known {
    pub name: &'static str,
    /// `(archive, suite)`: `debian` or `debian-security` under the machine's mirror.
    suites: &'static [(&'static str, &'static str)],
    /// The metapackage naming the newest image of that line.
    meta: &'static str,
    /// Only this test binary, where the agent is expected to refuse the kernel.
    pub only: Option<&'static str>,
}

pub const KNOWN: &[Known] = &[
    Known {
        name: "6.1",
        suites: BOOKWORM,
        meta: "linux-image-amd64",
        only: None,
    },
    Known {
        name: "6.12",
        suites: BOOKWORM,
        meta: "linux-image-6.12-amd64",
        only: None,
    },
    Known {
        name: "5.10",
        suites: &[
            ("debian", "bullseye"),
            ("debian-security", "bullseye-security"),
        ],
        meta: "linux-image-amd64",
        // No SO_NETNS_COOKIE (5.14): the agent stops at start, which `kernel` asserts.
        only: Some("kernel"),
    },
];

const BOOKWORM: &[(&str, &str)] = &[
    ("debian", "bookworm"),
    ("debian-security", "bookworm-security"),
];

/// A kernel ready to boot.
pub struct Kernel {
    /// What reports call it: `6.1`, or the file name of a kernel given by path.
    pub name: String,
    /// `uname -r` inside the guest.
    pub release: String,
    /// The unpacked package: `boot/`, `lib/modules/`.
    pub root: PathBuf,
    pub vmlinuz: PathBuf,
    /// `lib/modules/RELEASE`, indexed.
    pub modules: PathBuf,
    /// Only this test binary (see [`Known::only`]).
    pub only: Option<&'static str>,
}

/// A known kernel by name, or a kernel given by path: a `linux-image-*.deb`, or a
/// directory holding `boot/vmlinuz-*` and `lib/modules/*` (an unpacked package).
pub fn resolve(choice: &str, cache: &Path) -> Result<Kernel> {
    if let Some(known) = KNOWN.iter().find(|k| k.name == choice) {
        return Ok(Kernel {
            only: known.only,
            ..fetch(known, cache)?
        });
    }
    let path = Path::new(choice);
    if path.is_dir() {
        return from_tree(&file_name(path), path);
    }
    if path.extension().is_some_and(|e| e == "deb") && path.is_file() {
        let dir = cache.join(file_name(path));
        return unpack_once(&file_name(path), &dir, |root| {
            sh::run(
                "dpkg",
                &["-x", &path.to_string_lossy(), &root.to_string_lossy()],
            )
        });
    }
    let names: Vec<_> = KNOWN.iter().map(|k| k.name).collect();
    bail!(
        "--kernel {choice}: not a known kernel ({}), a linux-image .deb or an unpacked kernel directory",
        names.join(", ")
    )
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

/// The newest image of a known line, downloaded once.
fn fetch(known: &Known, cache: &Path) -> Result<Kernel> {
    let dir = cache.join(known.name);
    unpack_once(known.name, &dir, |root| {
        let apt = PrivateApt::new(&cache.join(format!("apt-{}", known.name)), known.suites)?;
        let image = apt.depends(known.meta)?;
        println!("vm: fetching {image} for {}", known.name);
        let deb = apt.download(&image)?;
        sh::run(
            "dpkg",
            &["-x", &deb.to_string_lossy(), &root.to_string_lossy()],
        )?;
        fs::remove_file(&deb).ok();
        Ok(())
    })
}

/// Unpacks into `dir/root` with `unpack` unless a previous run finished doing so (it writes
/// `dir/release` last), then indexes the modules.
fn unpack_once(name: &str, dir: &Path, unpack: impl FnOnce(&Path) -> Result<()>) -> Result<Kernel> {
    let root = dir.join("root");
    let done = dir.join("release");
    if !done.exists() {
        if root.exists() {
            fs::remove_dir_all(&root).with_context(|| format!("clearing {}", root.display()))?;
        }
        fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
        unpack(&root)?;
        let kernel = from_tree(name, &root)?;
        sh::run("depmod", &["-b", &root.to_string_lossy(), &kernel.release]).context(
            "indexing the kernel's modules (kmod's depmod, which `cargo xtask setup` installs)",
        )?;
        fs::write(&done, &kernel.release)?;
        return Ok(kernel);
    }
    from_tree(name, &root)
}

/// The kernel in an unpacked package tree.
fn from_tree(name: &str, root: &Path) -> Result<Kernel> {
    let boot = root.join("boot");
    let vmlinuz = fs::read_dir(&boot)
        .with_context(|| {
            format!(
                "{} has no boot/ directory: not an unpacked kernel",
                root.display()
            )
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| file_name(p).starts_with("vmlinuz-"))
        .with_context(|| format!("no vmlinuz-* in {}", boot.display()))?;
    let release = file_name(&vmlinuz)["vmlinuz-".len()..].to_string();
    let modules = root.join("lib/modules").join(&release);
    if !modules.is_dir() {
        bail!("{} has no lib/modules/{release}", root.display());
    }
    Ok(Kernel {
        name: name.to_string(),
        release,
        root: root.to_path_buf(),
        vmlinuz,
        modules,
        only: None,
    })
}

/// apt with its own sources, lists and cache: the machine's apt setup stays as it is.
struct PrivateApt {
    options: Vec<String>,
    archives: PathBuf,
}

impl PrivateApt {
    fn new(dir: &Path, suites: &[(&str, &str)]) -> Result<Self> {
        let (mirror, security) = mirrors();
        let mut list = String::new();
        for (archive, suite) in suites {
            let uri = if *archive == "debian-security" {
                &security
            } else {
                &mirror
            };
            list.push_str(&format!(
                "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] {uri} {suite} main\n"
            ));
        }
        let parts = dir.join("sources.list.d");
        let lists = dir.join("lists");
        let archives = dir.join("cache/archives");
        for d in [&parts, &lists.join("partial"), &archives.join("partial")] {
            fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        }
        let sources = dir.join("sources.list");
        fs::write(&sources, list)?;
        let options = [
            format!("Dir::Etc::SourceList={}", sources.display()),
            format!("Dir::Etc::SourceParts={}", parts.display()),
            format!("Dir::State::Lists={}", lists.display()),
            format!("Dir::Cache={}", dir.join("cache").display()),
            // The machine's own apt lock is not ours to take.
            "Debug::NoLocking=1".to_string(),
        ]
        .into_iter()
        .flat_map(|o| ["-o".to_string(), o])
        .collect();
        let apt = Self { options, archives };
        apt.run("apt-get", &["-q", "update"])
            .context("fetching the Debian package lists for the VM kernels (is the Debian mirror reachable?)")?;
        Ok(apt)
    }

    fn run(&self, cmd: &str, args: &[&str]) -> Result<String> {
        let mut all: Vec<&str> = self.options.iter().map(String::as_str).collect();
        all.extend(args);
        sh::output(cmd, &all)
    }

    /// The image package a metapackage depends on.
    fn depends(&self, meta: &str) -> Result<String> {
        let out = self.run("apt-cache", &["depends", meta])?;
        out.lines()
            .find_map(|l| l.trim().strip_prefix("Depends: "))
            .filter(|p| p.starts_with("linux-image-"))
            .map(str::to_string)
            .with_context(|| format!("{meta} names no kernel image:\n{out}"))
    }

    fn download(&self, package: &str) -> Result<PathBuf> {
        // `apt-get download` writes into the working directory.
        let out = std::process::Command::new("apt-get")
            .args(&self.options)
            .args(["-q", "download", package])
            .current_dir(&self.archives)
            .output()
            .context("running apt-get download")?;
        if !out.status.success() {
            bail!(
                "apt-get download {package} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        fs::read_dir(&self.archives)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| {
                file_name(p).starts_with(&format!("{package}_")) && file_name(p).ends_with(".deb")
            })
            .with_context(|| format!("apt-get download {package} left no .deb"))
    }
}

/// The Debian mirror and security mirror the machine's own sources name (deb822 or
/// one-line), falling back to deb.debian.org.
fn mirrors() -> (String, String) {
    let mut uris = Vec::new();
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(dir) = fs::read_dir("/etc/apt/sources.list.d") {
        files.extend(dir.filter_map(|e| e.ok().map(|e| e.path())));
    }
    for f in files {
        let Ok(text) = fs::read_to_string(&f) else {
            continue;
        };
        for line in text.lines().map(str::trim) {
            if let Some(rest) = line.strip_prefix("URIs:") {
                uris.extend(rest.split_whitespace().map(str::to_string));
            } else if let Some(rest) = line.strip_prefix("deb ") {
                uris.extend(
                    rest.split_whitespace()
                        .find(|w| w.contains("://"))
                        .map(str::to_string),
                );
            }
        }
    }
    let pick = |security: bool, default: &str| {
        uris.iter()
            .find(|u| {
                u.contains("debian") && u.trim_end_matches('/').ends_with("-security") == security
            })
            .cloned()
            .unwrap_or_else(|| default.to_string())
    };
    (
        pick(false, "http://deb.debian.org/debian"),
        pick(true, "http://deb.debian.org/debian-security"),
    )
}
