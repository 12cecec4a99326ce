//! Booting a guest under qemu and following its console.

use std::{
    fs,
    io::{Read, Seek, SeekFrom},
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};

use super::{image, kernel::Kernel};

/// How the guest's CPUs run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    /// Software emulation (multi-threaded TCG).
    Tcg,
}

/// One boot.
pub struct Boot<'a> {
    pub kernel: &'a Kernel,
    pub initrd: &'a Path,
    /// The guest's console, written by qemu.
    pub console: &'a Path,
    pub accel: Accel,
    pub cpus: u32,
    pub memory_mib: u32,
    /// The job must have printed its start line by then, or the boot failed.
    pub start_within: Duration,
    /// The whole run, boot included.
    pub timeout: Duration,
}

/// How a boot ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// The guest powered off; its job printed the exit line with this code, or none.
    Finished(Option<i32>),
    /// No start line within `start_within` (killed).
    NeverStarted,
    /// Still running at `timeout` (killed).
    TimedOut,
}

/// Boots and follows the console until the guest stops, handing each complete line to
/// `line` as it arrives.
pub fn run(boot: &Boot<'_>, mut line: impl FnMut(&str)) -> Result<Ended> {
    let mut child = spawn(boot)?;
    let began = Instant::now();
    let mut console = Follow::new(boot.console);
    let (mut started, mut exit) = (false, None);
    let mut each = |l: &str, started: &mut bool, exit: &mut Option<i32>| {
        if l.starts_with(image::STARTED) {
            *started = true;
        }
        if let Some(code) = l.trim().strip_prefix(image::EXIT) {
            *exit = code.parse().ok();
        }
        line(l);
    };
    loop {
        let done = child.try_wait()?.is_some();
        for l in console.lines()? {
            each(&l, &mut started, &mut exit);
        }
        if done {
            if let Some(rest) = console.rest()? {
                each(&rest, &mut started, &mut exit);
            }
            return Ok(if started || exit.is_some() {
                Ended::Finished(exit)
            } else {
                Ended::NeverStarted
            });
        }
        let elapsed = began.elapsed();
        if !started && exit.is_none() && elapsed > boot.start_within {
            kill(&mut child);
            return Ok(Ended::NeverStarted);
        }
        if elapsed > boot.timeout {
            kill(&mut child);
            return Ok(Ended::TimedOut);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Whether KVM runs this kernel: the bare initramfs (no job) must boot through its first
/// stage, which ends at once saying the job is missing, within `within`.
pub fn kvm_works(kernel: &Kernel, initrd: &Path, console: &Path, within: Duration) -> bool {
    if fs::File::open("/dev/kvm").is_err() {
        return false;
    }
    let boot = Boot {
        kernel,
        initrd,
        console,
        accel: Accel::Kvm,
        cpus: 1,
        memory_mib: 512,
        start_within: within,
        timeout: within,
    };
    matches!(run(&boot, |_| {}), Ok(Ended::Finished(_)))
}

fn spawn(boot: &Boot<'_>) -> Result<Child> {
    fs::write(boot.console, b"")?;
    let (accel, cpu) = match boot.accel {
        Accel::Kvm => ("kvm", "host"),
        Accel::Tcg => ("tcg,thread=multi", "max"),
    };
    let stderr = fs::File::create(boot.console.with_extension("qemu.log"))?;
    Command::new("qemu-system-x86_64")
        .args(["-accel", accel, "-cpu", cpu])
        .args(["-smp", &boot.cpus.to_string()])
        .args(["-m", &format!("{}M", boot.memory_mib)])
        .args([
            "-display",
            "none",
            "-monitor",
            "none",
            "-nic",
            "none",
            "-no-reboot",
        ])
        .arg("-serial")
        .arg(format!("file:{}", boot.console.display()))
        .arg("-kernel")
        .arg(&boot.kernel.vmlinuz)
        .arg("-initrd")
        .arg(boot.initrd)
        // tsc=unstable: 6.12 oopsed in early boot under TCG without it (VM.md).
        .args(["-append", "console=ttyS0 panic=-1 tsc=unstable loglevel=4"])
        .args([
            "-fsdev",
            "local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap",
            "-device",
            &format!("virtio-9p-pci,fsdev=hostroot,mount_tag={}", image::HOST_TAG),
            "-device",
            "virtio-rng-pci",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .context(
            "starting qemu-system-x86_64 (qemu-system-x86, which `cargo xtask setup` installs)",
        )
}

fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Reads what was appended to a file since the last call, line by line.
struct Follow<'a> {
    path: &'a Path,
    offset: u64,
    partial: String,
}

impl<'a> Follow<'a> {
    fn new(path: &'a Path) -> Self {
        Self {
            path,
            offset: 0,
            partial: String::new(),
        }
    }

    fn lines(&mut self) -> Result<Vec<String>> {
        let mut f = fs::File::open(self.path)?;
        f.seek(SeekFrom::Start(self.offset))?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf)?;
        self.offset += buf.len() as u64;
        self.partial.push_str(&String::from_utf8_lossy(&buf));
        let mut out = Vec::new();
        while let Some(i) = self.partial.find('\n') {
            let l: String = self.partial.drain(..=i).collect();
            out.push(l.trim_end_matches(['\r', '\n']).to_string());
        }
        Ok(out)
    }

    /// A last line without its newline.
    fn rest(&mut self) -> Result<Option<String>> {
        let _ = self.lines()?;
        Ok((!self.partial.is_empty()).then(|| std::mem::take(&mut self.partial)))
    }
}
