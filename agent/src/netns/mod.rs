//! Working inside a pod's network namespace from the agent's own process.
//!
//! A socket belongs to the network namespace of the thread that created it, for its whole
//! life. So the agent switches the *current thread* into the pod's namespace just long
//! enough to create a socket, and switches back before doing anything else (the same
//! approach as ztunnel's in-pod mode). The closure must not block or yield.

use std::{
    fs::File,
    os::fd::{AsFd, AsRawFd},
    path::{Path, PathBuf},
    sync::OnceLock,
};

use nix::sched::{setns, CloneFlags};

mod addresses;
pub use addresses::{AddressWatch, Addresses};

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("cannot open network namespace {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot enter network namespace {path}: {source} (the agent needs CAP_SYS_ADMIN)")]
    Enter { path: PathBuf, source: nix::Error },
    #[error("cannot watch the addresses of network namespace {path}: {source}")]
    Netlink {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read the cookie of network namespace {path}: {source} (needs Linux >= 5.14)")]
    Cookie {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The namespace the agent started in, to return to after each switch.
fn home() -> &'static File {
    static HOME: OnceLock<File> = OnceLock::new();
    HOME.get_or_init(|| {
        File::open("/proc/self/ns/net").expect("cannot open the agent's own network namespace")
    })
}

#[derive(Debug)]
pub struct Netns {
    file: File,
    path: PathBuf,
    /// The agent's own namespace (sidecar mode): nothing to switch, and no CAP_SYS_ADMIN
    /// needed for setns.
    own: bool,
}

fn ident(f: &File) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    f.metadata().ok().map(|m| (m.dev(), m.ino()))
}

impl Netns {
    pub fn open(path: &Path) -> Result<Self, NetnsError> {
        // Pin the home namespace before the first switch can happen on any thread.
        let _ = home();
        let file = File::open(path).map_err(|source| NetnsError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        let own = ident(&file).is_some() && ident(&file) == ident(home());
        Ok(Self {
            file,
            path: path.to_path_buf(),
            own,
        })
    }

    /// Whether this is the agent's own network namespace.
    pub fn is_own(&self) -> bool {
        self.own
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether `path` still names this namespace (it is gone once the bind mount is
    /// removed or the process behind `/proc/PID/ns/net` exits; our own descriptor keeps
    /// the namespace itself alive, so that is not the test).
    pub fn still_at_path(&self) -> bool {
        use std::os::unix::fs::MetadataExt;
        let (Ok(ours), Ok(there)) = (self.file.metadata(), std::fs::metadata(&self.path)) else {
            return false;
        };
        ours.dev() == there.dev() && ours.ino() == there.ino()
    }

    /// The namespace's identity on nsfs (device, inode), as the state file records it.
    pub fn ident(&self) -> (u64, u64) {
        use std::os::unix::fs::MetadataExt;
        self.file
            .metadata()
            .map(|m| (m.dev(), m.ino()))
            .unwrap_or((0, 0))
    }

    /// Runs `f` with the current thread inside this namespace.
    pub fn run<T>(&self, f: impl FnOnce() -> T) -> Result<T, NetnsError> {
        if self.own {
            return Ok(f());
        }
        setns(self.file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|source| NetnsError::Enter {
            path: self.path.clone(),
            source,
        })?;
        let out = f();
        // A thread left in a pod's namespace would silently create later sockets there:
        // that is not recoverable, so stop the process rather than carry on.
        if let Err(e) = setns(home().as_fd(), CloneFlags::CLONE_NEWNET) {
            panic!("cannot return to the agent's network namespace: {e}");
        }
        Ok(out)
    }

    /// The kernel's cookie for this namespace: what `bpf_get_netns_cookie` returns for
    /// sockets in it, and so the key of the pod in the kernel maps.
    pub fn cookie(&self) -> Result<u64, NetnsError> {
        let err = |source| NetnsError::Cookie {
            path: self.path.clone(),
            source,
        };
        let sock = self
            .run(|| socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None))?
            .map_err(err)?;
        socket_netns_cookie(&sock).map_err(err)
    }
}

/// The cookie of the network namespace a socket lives in (SO_NETNS_COOKIE, Linux 5.14).
#[allow(
    unsafe_code,
    reason = "SO_NETNS_COOKIE has no safe wrapper in nix or socket2: one getsockopt on a u64"
)]
pub fn socket_netns_cookie(sock: &impl AsRawFd) -> std::io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid socket fd, and cookie/len describe a u64 buffer.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cookie)
}
