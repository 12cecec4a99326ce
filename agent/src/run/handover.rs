//! Hot restart: a new agent takes over the running one's listening sockets, so an upgrade
//! refuses no connection.
//!
//! The running agent listens on `<state_dir>/handover.sock` (a SEQPACKET Unix socket, mode
//! 0600: root only). A starting agent that finds it asks for a handover before enrolling
//! anything, and gets, one message per pod, the pod's listening sockets (SCM_RIGHTS), then
//! the old agent's original-destination map. It enrols the pods recorded in the state
//! directory as it would after a restart, on those same sockets (nothing is bound again, so
//! nothing queued in them is lost), attaches its own programs (replacing the pinned links
//! of fail-closed pods without a gap) and says it is ready. Only then does the old agent
//! stop accepting and drain its open connections within the drain deadline; it exits
//! without blocking, unpinning or recording anything: that is all the new agent's now.
//!
//! While both run, a connection may be redirected by the old agent's programs (its
//! original destination then sits in the old agent's map) and accepted by the new agent:
//! the new agent looks there when its own map has no entry. A new agent that dies before it
//! is ready changes nothing: the old one never stopped serving.

use std::{
    collections::HashMap,
    io::{IoSlice, IoSliceMut},
    net::SocketAddr,
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd},
    path::{Path, PathBuf},
    time::Duration,
};

use nix::{
    errno::Errno,
    sys::{
        socket::{
            self, sockopt, AddressFamily, Backlog, ControlMessage, ControlMessageOwned, MsgFlags,
            SockFlag, SockType, UnixAddr,
        },
        time::TimeVal,
    },
};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

use super::node::Event;

const SOCKET: &str = "handover.sock";
/// A pod's listeners, at most: outbound and inbound, IPv4 and IPv6.
const MAX_FDS: usize = 4;
/// How long the old agent waits for the new one to be ready (it enrols every pod first).
const READY_WITHIN: Duration = Duration::from_secs(300);
/// How long a new agent waits for the old one's answer.
const ANSWER_WITHIN: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error("handover socket {path}: {source} (another agent may be starting; if none is, remove the file)")]
    Socket { path: PathBuf, source: Errno },
    #[error("handover with the running agent failed: {0} (start again to take over, or stop the running agent first)")]
    Protocol(String),
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Message {
    /// New → old: hand over your listeners.
    Request,
    /// Old → new: one pod's listeners, whose descriptors ride along in this order.
    Pod {
        name: String,
        listeners: Vec<SocketAddr>,
    },
    /// Old → new: the end; the descriptor of the old agent's original-destination map
    /// rides along.
    Done,
    /// New → old: enrolled and serving; stop accepting and drain.
    Ready,
}

/// What the running agent hands over, as [`Node::offer`](super::node::Node) lists it.
pub(super) struct Offer {
    pub pods: Vec<(String, Vec<(SocketAddr, OwnedFd)>)>,
    pub orig_dst: Option<OwnedFd>,
}

/// A handover in progress, on the new agent's side.
pub(super) struct Takeover {
    conn: OwnedFd,
    /// Listening sockets by (pod, loopback address).
    pub listeners: HashMap<(String, SocketAddr), std::net::TcpListener>,
    pub orig_dst: Option<OwnedFd>,
}

fn path_of(state_dir: &Path) -> PathBuf {
    state_dir.join(SOCKET)
}

fn seqpacket() -> Result<OwnedFd, Errno> {
    socket::socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
}

fn protocol(e: impl std::fmt::Display) -> HandoverError {
    HandoverError::Protocol(e.to_string())
}

fn send(conn: &impl AsFd, msg: &Message, fds: &[RawFd]) -> Result<(), HandoverError> {
    let bytes = serde_json::to_vec(msg).map_err(protocol)?;
    let cmsgs: &[ControlMessage] = if fds.is_empty() {
        &[]
    } else {
        &[ControlMessage::ScmRights(fds)]
    };
    socket::sendmsg::<()>(
        conn.as_fd().as_raw_fd(),
        &[IoSlice::new(&bytes)],
        cmsgs,
        MsgFlags::empty(),
        None,
    )
    .map_err(protocol)?;
    Ok(())
}

#[allow(
    unsafe_code,
    reason = "descriptors received with SCM_RIGHTS arrive as raw numbers that only this process owns"
)]
fn recv(conn: &impl AsFd) -> Result<(Message, Vec<OwnedFd>), HandoverError> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS]);
    let mut iov = [IoSliceMut::new(&mut buf)];
    let msg = socket::recvmsg::<()>(
        conn.as_fd().as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(protocol)?;
    let mut fds = Vec::new();
    for c in msg.cmsgs().map_err(protocol)? {
        if let ControlMessageOwned::ScmRights(raw) = c {
            // SAFETY: the kernel installed these descriptors in this process for this
            // message; nothing else refers to them.
            fds.extend(
                raw.into_iter()
                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
            );
        }
    }
    let n = msg.bytes;
    if n == 0 {
        return Err(protocol("the other agent went away"));
    }
    let parsed = serde_json::from_slice(&buf[..n]).map_err(protocol)?;
    Ok((parsed, fds))
}

/// Asks the agent running on this state directory, if any, for its listeners. `None` when
/// no agent answers there (none runs, or one died and left its socket).
pub(super) fn request(state_dir: &Path) -> Result<Option<Takeover>, HandoverError> {
    let path = path_of(state_dir);
    if !path.exists() {
        return Ok(None);
    }
    let socket_err = |source| HandoverError::Socket {
        path: path.clone(),
        source,
    };
    let conn = seqpacket().map_err(socket_err)?;
    let addr = UnixAddr::new(&path).map_err(socket_err)?;
    match socket::connect(conn.as_raw_fd(), &addr) {
        Ok(()) => {}
        Err(Errno::ECONNREFUSED | Errno::ENOENT) => return Ok(None),
        Err(e) => return Err(socket_err(e)),
    }
    let timeout = TimeVal::new(ANSWER_WITHIN.as_secs() as _, 0);
    socket::setsockopt(&conn, sockopt::ReceiveTimeout, &timeout).map_err(socket_err)?;
    send(&conn, &Message::Request, &[])?;
    let mut listeners = HashMap::new();
    loop {
        match recv(&conn)? {
            (
                Message::Pod {
                    name,
                    listeners: addrs,
                },
                fds,
            ) if fds.len() == addrs.len() => {
                for (addr, fd) in addrs.into_iter().zip(fds) {
                    listeners.insert((name.clone(), addr), std::net::TcpListener::from(fd));
                }
            }
            (Message::Done, mut fds) => {
                return Ok(Some(Takeover {
                    conn,
                    listeners,
                    orig_dst: fds.pop(),
                }))
            }
            (other, fds) => {
                return Err(protocol(format!(
                    "unexpected {other:?} with {} descriptors",
                    fds.len()
                )))
            }
        }
    }
}

impl Takeover {
    /// Tells the previous agent this one serves every pod now.
    pub fn ready(self) -> Result<(), HandoverError> {
        send(&self.conn, &Message::Ready, &[])
    }
}

/// Serves handover requests on this state directory from a thread of its own. A request
/// goes to the node loop as [`Event::Handover`]; once the new agent is ready,
/// [`Event::HandedOver`] tells the loop to stop.
pub(super) fn serve(
    state_dir: &Path,
    events: mpsc::UnboundedSender<Event>,
) -> Result<(), HandoverError> {
    let path = path_of(state_dir);
    let socket_err = |source| HandoverError::Socket {
        path: path.clone(),
        source,
    };
    let listener = seqpacket().map_err(socket_err)?;
    // A previous agent's socket: it is being (or has been) replaced by this one.
    let _ = std::fs::remove_file(&path);
    let addr = UnixAddr::new(&path).map_err(socket_err)?;
    socket::bind(listener.as_raw_fd(), &addr).map_err(socket_err)?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| socket_err(Errno::from_raw(e.raw_os_error().unwrap_or(0))))?;
    }
    socket::listen(&listener, Backlog::new(4).map_err(socket_err)?).map_err(socket_err)?;
    std::thread::Builder::new()
        .name("handover".into())
        .spawn(move || loop {
            let conn = match accept(&listener) {
                Ok(c) => c,
                Err(e) => {
                    warn!(error = %e, "handover socket: accept failed");
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            };
            match hand_over(&conn, &events) {
                Ok(pods) => {
                    info!(pods, "the new agent is ready: handing over");
                    let _ = events.send(Event::HandedOver);
                    return;
                }
                Err(e) => warn!(error = %e, "a handover did not complete; still serving"),
            }
        })
        .map_err(|e| socket_err(Errno::from_raw(e.raw_os_error().unwrap_or(0))))?;
    Ok(())
}

#[allow(
    unsafe_code,
    reason = "accept(2) returns a raw descriptor that only this thread owns"
)]
fn accept(listener: &OwnedFd) -> Result<OwnedFd, Errno> {
    let fd = socket::accept4(listener.as_raw_fd(), SockFlag::SOCK_CLOEXEC)?;
    // SAFETY: accept4 just returned this new descriptor; nothing else refers to it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// One handover, on the old agent's side; returns the number of pods handed over.
fn hand_over(
    conn: &OwnedFd,
    events: &mpsc::UnboundedSender<Event>,
) -> Result<usize, HandoverError> {
    let timeout = TimeVal::new(ANSWER_WITHIN.as_secs() as _, 0);
    socket::setsockopt(conn, sockopt::ReceiveTimeout, &timeout).map_err(protocol)?;
    match recv(conn)? {
        (Message::Request, _) => {}
        (other, _) => return Err(protocol(format!("unexpected {other:?}"))),
    }
    let (tx, rx) = oneshot::channel();
    events
        .send(Event::Handover(tx))
        .map_err(|_| protocol("the agent is stopping"))?;
    let offer = rx
        .blocking_recv()
        .map_err(|_| protocol("the agent is stopping"))?;
    let pods = offer.pods.len();
    for (name, listeners) in &offer.pods {
        let addrs = listeners.iter().map(|(a, _)| *a).collect();
        let fds: Vec<RawFd> = listeners.iter().map(|(_, fd)| fd.as_raw_fd()).collect();
        send(
            conn,
            &Message::Pod {
                name: name.clone(),
                listeners: addrs,
            },
            &fds,
        )?;
    }
    let orig: Vec<RawFd> = offer.orig_dst.iter().map(AsRawFd::as_raw_fd).collect();
    send(conn, &Message::Done, &orig)?;
    info!(
        pods,
        "listeners handed to a new agent; waiting for it to be ready"
    );
    let timeout = TimeVal::new(READY_WITHIN.as_secs() as _, 0);
    socket::setsockopt(conn, sockopt::ReceiveTimeout, &timeout).map_err(protocol)?;
    match recv(conn)? {
        (Message::Ready, _) => Ok(pods),
        (other, _) => Err(protocol(format!("unexpected {other:?}"))),
    }
}
