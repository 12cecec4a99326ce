//! Ways an application might try to reach a destination around the agent, each made for
//! real from inside a pod by `podapp attempt` (so the socket belongs to the pod's cgroup)
//! and reported as one JSON [`Outcome`]. The bypass suite judges them by what the target
//! application saw, never by what the attempt itself believes.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    os::fd::AsRawFd,
    time::Duration,
};

use serde::{Deserialize, Serialize};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

/// How long an attempt waits for a connection or an answer.
const PATIENCE: Duration = Duration::from_secs(3);

/// The way a destination is tried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// A plain TCP connect from a socket of the destination's family.
    Tcp,
    /// TCP from an IPv6 socket to the IPv4-mapped form of an IPv4 destination.
    TcpMapped,
    /// TCP Fast Open: the connection is made by `sendto(MSG_FASTOPEN)`, not `connect`.
    FastOpen,
    /// TCP connected through io_uring (IORING_OP_CONNECT) instead of the syscall.
    IoUring,
    /// One unconnected UDP datagram (`sendto`).
    UdpSend,
    /// A connected UDP socket (`connect` + `send`).
    UdpConnect,
    /// `sendto` from an IPv6 socket to the IPv4-mapped form of an IPv4 destination.
    UdpMapped,
    /// A UDP datagram written by hand on a raw IPv4 socket (needs NET_RAW).
    RawUdp,
}

impl std::str::FromStr for Kind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        serde_json::from_value(serde_json::Value::String(s.into()))
            .map_err(|_| format!("unknown attempt kind {s:?}"))
    }
}

/// Tricks applied to the attempt's socket before it is used.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Tricks {
    /// SO_MARK (an app with NET_ADMIN in its namespace can set any mark).
    pub mark: Option<u32>,
    /// Bind this source address first (e.g. an excluded port as the source port).
    pub bind: Option<SocketAddr>,
    /// Run the attempt as this uid (Istio exempts its proxy's uid 1337 from redirection;
    /// a uid must mean nothing here). Applied to the process, not the socket.
    pub uid: Option<u32>,
}

/// What the attempt itself saw.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Outcome {
    pub kind: Kind,
    pub to: SocketAddr,
    /// The request was sent (connected and written, or the datagram handed to the kernel).
    pub sent: bool,
    /// An answer came back (the application's response, or the UDP echo).
    pub answered: bool,
    pub error: Option<String>,
}

/// Makes the attempt and reports it; never panics on a refusal (that is the point).
pub fn run(kind: Kind, to: SocketAddr, tricks: &Tricks) -> Outcome {
    let mut out = Outcome {
        kind,
        to,
        sent: false,
        answered: false,
        error: None,
    };
    let result = match kind {
        Kind::Tcp | Kind::TcpMapped | Kind::FastOpen | Kind::IoUring => {
            tcp(kind, to, tricks, &mut out)
        }
        Kind::UdpSend | Kind::UdpConnect | Kind::UdpMapped => udp(kind, to, tricks, &mut out),
        Kind::RawUdp => raw_udp(to, &mut out),
    };
    if let Err(e) = result {
        out.error = Some(e.to_string());
    }
    out
}

/// The request line of `simnode::proto` with its payload: the application answers it.
fn request() -> Vec<u8> {
    let mut r = crate::proto::request_line(5, 5, 1).into_bytes();
    r.extend_from_slice(b"hello");
    r
}

fn socket_for(to: SocketAddr, ty: Type, proto: Protocol, v6: bool) -> std::io::Result<Socket> {
    let domain = if v6 || to.is_ipv6() {
        Domain::IPV6
    } else {
        Domain::IPV4
    };
    Socket::new(domain, ty, Some(proto))
}

fn apply(s: &Socket, tricks: &Tricks) -> std::io::Result<()> {
    if let Some(mark) = tricks.mark {
        s.set_mark(mark)?;
    }
    if let Some(bind) = tricks.bind {
        s.set_reuse_address(true)?;
        s.bind(&bind.into())?;
    }
    Ok(())
}

/// `a.b.c.d:p` as `[::ffff:a.b.c.d]:p`.
fn mapped(to: SocketAddr) -> SocketAddr {
    match to {
        SocketAddr::V4(v4) => SocketAddr::new(v4.ip().to_ipv6_mapped().into(), v4.port()),
        v6 => v6,
    }
}

fn tcp(kind: Kind, to: SocketAddr, tricks: &Tricks, out: &mut Outcome) -> std::io::Result<()> {
    let v6 = kind == Kind::TcpMapped;
    let s = socket_for(to, Type::STREAM, Protocol::TCP, v6)?;
    apply(&s, tricks)?;
    let dst: SockAddr = if v6 { mapped(to) } else { to }.into();
    let req = request();
    match kind {
        Kind::FastOpen => {
            // The SYN carries the data: no connect() call at all.
            s.send_to_with_flags(&req, &dst, libc::MSG_FASTOPEN)?;
            out.sent = true;
        }
        Kind::IoUring => {
            uring_connect(&s, &dst)?;
        }
        _ => s.connect_timeout(&dst, crate::time::scaled(PATIENCE))?,
    }
    let mut stream: TcpStream = s.into();
    stream.set_read_timeout(Some(crate::time::scaled(PATIENCE)))?;
    stream.set_write_timeout(Some(crate::time::scaled(PATIENCE)))?;
    if !out.sent {
        stream.write_all(&req)?;
        out.sent = true;
    }
    let mut answer = [0u8; 3];
    stream.read_exact(&mut answer)?;
    out.answered = &answer == b"OK ";
    Ok(())
}

/// connect(2) done by the kernel's io_uring worker on our behalf.
fn uring_connect(s: &Socket, dst: &SockAddr) -> std::io::Result<()> {
    let mut ring = io_uring::IoUring::new(2)?;
    let op =
        io_uring::opcode::Connect::new(io_uring::types::Fd(s.as_raw_fd()), dst.as_ptr(), dst.len())
            .build();
    #[allow(
        unsafe_code,
        reason = "io_uring submissions are unsafe: the kernel reads `dst` until completion"
    )]
    // SAFETY: `dst` and the socket outlive the submission: we wait for its completion below.
    unsafe {
        ring.submission()
            .push(&op)
            .map_err(|_| std::io::Error::other("io_uring submission queue full"))?;
    }
    ring.submit_and_wait(1)?;
    let cqe = ring
        .completion()
        .next()
        .ok_or_else(|| std::io::Error::other("io_uring gave no completion"))?;
    match cqe.result() {
        r if r < 0 => Err(std::io::Error::from_raw_os_error(-r)),
        _ => Ok(()),
    }
}

fn udp(kind: Kind, to: SocketAddr, tricks: &Tricks, out: &mut Outcome) -> std::io::Result<()> {
    let v6 = kind == Kind::UdpMapped;
    let s = socket_for(to, Type::DGRAM, Protocol::UDP, v6)?;
    apply(&s, tricks)?;
    s.set_read_timeout(Some(Duration::from_millis(500)))?;
    let dst: SockAddr = if v6 { mapped(to) } else { to }.into();
    for _ in 0..3 {
        if kind == Kind::UdpConnect {
            s.connect(&dst)?;
            s.send(b"ping")?;
        } else {
            s.send_to(b"ping", &dst)?;
        }
        out.sent = true;
        let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 16];
        if s.recv(&mut buf).is_ok() {
            out.answered = true;
            break;
        }
    }
    Ok(())
}

/// A UDP header and payload written by hand: the kernel adds only the IPv4 header, and no
/// cgroup sendmsg hook runs for raw sockets.
fn raw_udp(to: SocketAddr, out: &mut Outcome) -> std::io::Result<()> {
    let SocketAddr::V4(v4) = to else {
        return Err(std::io::Error::other("raw-udp is IPv4 only"));
    };
    let s = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::UDP))?;
    let payload = b"ping";
    let len = (8 + payload.len()) as u16;
    let mut dgram = Vec::with_capacity(len as usize);
    // Source port, destination port and length in network byte order; checksum 0 (none,
    // allowed for UDP over IPv4).
    dgram.extend_from_slice(&40000u16.to_be_bytes());
    dgram.extend_from_slice(&v4.port().to_be_bytes());
    dgram.extend_from_slice(&len.to_be_bytes());
    dgram.extend_from_slice(&0u16.to_be_bytes());
    dgram.extend_from_slice(payload);
    s.send_to(&dgram, &SockAddr::from(to))?;
    out.sent = true;
    Ok(())
}
