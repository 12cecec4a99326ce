//! Copies bytes both ways between two streams (TCP or TLS), propagating half-close, and
//! counts them even when one side fails (the access log wants the numbers in every outcome).

use std::{
    io,
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// A bulk transfer grows its buffer to this, so it is not syscall-bound...
const BUF: usize = 64 * 1024;
/// ...while an idle or request/response connection keeps only this per direction (an idle
/// proxied connection is mostly these two buffers).
const BUF_START: usize = 2 * 1024;

#[derive(Debug, Default)]
pub struct Transfer {
    /// From the connection's initiator to the other side.
    pub sent: u64,
    /// Back to the initiator.
    pub received: u64,
    /// The first error seen, if any.
    pub error: Option<io::Error>,
}

/// Runs until both directions have finished. A clean EOF in one direction is passed on as
/// a half-close and the other direction goes on; an error (a reset, a broken pipe) ends
/// both at once, so a peer that vanishes never leaves the other side's connection open.
/// No byte either way for `idle` ends both too, with a `TimedOut` error.
pub async fn pump<A, B>(initiator: A, other: B, idle: Duration) -> Transfer
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let (mut ar, mut aw) = tokio::io::split(initiator);
    let (mut br, mut bw) = tokio::io::split(other);
    let (sent, received) = (AtomicU64::new(0), AtomicU64::new(0));
    let start = Instant::now();
    // Milliseconds since `start` of the last byte moved, either way.
    let last = AtomicU64::new(0);
    let both = async {
        let up = one_way(&mut ar, &mut bw, &sent, start, &last);
        let down = one_way(&mut br, &mut aw, &received, start, &last);
        tokio::pin!(up, down);
        tokio::select! {
            e = &mut up => match e {
                Some(e) => Some(e),
                None => down.await,
            },
            e = &mut down => match e {
                Some(e) => Some(e),
                None => up.await,
            },
        }
    };
    let error = tokio::select! {
        e = both => e,
        () = idle_for(idle, start, &last) => Some(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("idle for {} s (idle_timeout_ms)", idle.as_secs_f64()),
        )),
    };
    Transfer {
        sent: sent.load(Ordering::Relaxed),
        received: received.load(Ordering::Relaxed),
        error,
    }
}

/// Returns once nothing has moved for `idle`. Sleeps until the earliest moment that could
/// be true, so an active connection costs one timer wake-up per `idle`, not per byte.
async fn idle_for(idle: Duration, start: Instant, last: &AtomicU64) {
    loop {
        let last_ms = last.load(Ordering::Relaxed);
        let deadline = start + Duration::from_millis(last_ms) + idle;
        if Instant::now() >= deadline {
            return;
        }
        tokio::time::sleep_until(deadline.into()).await;
    }
}

/// Copies until EOF, then shuts down the writer so the peer sees our half-close (for TLS,
/// a close_notify followed by the TCP FIN). Counts into `total` as it goes, so the count
/// survives the other direction cutting this one short.
async fn one_way<R, W>(
    r: &mut R,
    w: &mut W,
    total: &AtomicU64,
    start: Instant,
    last: &AtomicU64,
) -> Option<io::Error>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; BUF_START];
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) => return Some(e),
        };
        if n == buf.len() && buf.len() < BUF {
            // A full read means a stream, not a message: take the large buffer.
            buf.resize(BUF, 0);
        }
        if let Err(e) = w.write_all(&buf[..n]).await {
            return Some(e);
        }
        total.fetch_add(n as u64, Ordering::Relaxed);
        last.fetch_max(start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
    if let Err(e) = w.shutdown().await {
        // The peer may already be gone; the bytes were delivered to its socket anyway.
        if e.kind() != io::ErrorKind::NotConnected {
            return Some(e);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::{TcpListener, TcpStream};

    const HOUR: Duration = Duration::from_secs(3600);

    /// A connection where nobody says anything is closed after the idle timeout, and one
    /// that keeps talking (more slowly than that, in total far longer) is not.
    #[tokio::test]
    async fn idle_connections_are_closed_and_talking_ones_are_not() {
        let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (server_addr, front_addr) = (server.local_addr().unwrap(), front.local_addr().unwrap());
        let srv = tokio::spawn(async move {
            let mut held = Vec::new();
            for _ in 0..2 {
                let (mut s, _) = server.accept().await.unwrap();
                let mut buf = [0u8; 16];
                held.push(tokio::spawn(async move {
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                }));
            }
            held
        });
        let idle = Duration::from_millis(300);
        let proxy = tokio::spawn(async move {
            let mut out = Vec::new();
            for _ in 0..2 {
                let (c, _) = front.accept().await.unwrap();
                let u = TcpStream::connect(server_addr).await.unwrap();
                out.push(tokio::spawn(pump(c, u, idle)));
            }
            out
        });
        let _silent = TcpStream::connect(front_addr).await.unwrap();
        let mut talking = TcpStream::connect(front_addr).await.unwrap();
        let started = Instant::now();
        let mut echo = [0u8; 1];
        for _ in 0..6 {
            tokio::time::sleep(Duration::from_millis(150)).await;
            talking.write_all(b"x").await.unwrap();
            talking.read_exact(&mut echo).await.unwrap();
        }
        let pumps = proxy.await.unwrap();
        let silent = pumps.into_iter().next().unwrap();
        let t = tokio::time::timeout(Duration::from_secs(2), silent)
            .await
            .expect("the silent connection must be closed")
            .unwrap();
        assert_eq!(t.error.unwrap().kind(), io::ErrorKind::TimedOut);
        // 900 ms of traffic in 150 ms steps outlived three idle timeouts.
        assert!(started.elapsed() > 3 * idle);
        drop(srv);
    }

    /// A client that half-closes still receives the whole reply through the pump.
    #[tokio::test]
    async fn half_close_is_propagated() {
        let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server_addr = server.local_addr().unwrap();
        let front_addr = front.local_addr().unwrap();
        let srv = tokio::spawn(async move {
            let (mut s, _) = server.accept().await.unwrap();
            let mut req = Vec::new();
            s.read_to_end(&mut req).await.unwrap();
            s.write_all(&vec![7u8; 300_000]).await.unwrap();
            req.len()
        });
        let proxy = tokio::spawn(async move {
            let (c, _) = front.accept().await.unwrap();
            let u = TcpStream::connect(server_addr).await.unwrap();
            pump(c, u, HOUR).await
        });
        let mut c = TcpStream::connect(front_addr).await.unwrap();
        c.write_all(b"hello").await.unwrap();
        c.shutdown().await.unwrap();
        let mut reply = Vec::new();
        c.read_to_end(&mut reply).await.unwrap();
        assert_eq!(reply.len(), 300_000);
        assert_eq!(srv.await.unwrap(), 5);
        let t = proxy.await.unwrap();
        assert_eq!((t.sent, t.received), (5, 300_000));
        assert!(t.error.is_none());
    }

    /// A client that resets must not leave the upstream connection open: the server here
    /// never closes, so only the reset can end the pump.
    #[tokio::test]
    async fn a_reset_ends_both_directions() {
        let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (server_addr, front_addr) = (server.local_addr().unwrap(), front.local_addr().unwrap());
        let srv = tokio::spawn(async move {
            let (s, _) = server.accept().await.unwrap();
            tokio::time::sleep(std::time::Duration::from_secs(30)).await;
            drop(s);
        });
        let proxy = tokio::spawn(async move {
            let (c, _) = front.accept().await.unwrap();
            let u = TcpStream::connect(server_addr).await.unwrap();
            pump(c, u, HOUR).await
        });
        let mut c = TcpStream::connect(front_addr).await.unwrap();
        c.write_all(b"x").await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        socket2::SockRef::from(&c)
            .set_linger(Some(std::time::Duration::ZERO))
            .unwrap();
        drop(c);
        let t = tokio::time::timeout(std::time::Duration::from_secs(5), proxy)
            .await
            .expect("the pump must end when the client resets")
            .unwrap();
        assert!(t.error.is_some());
        assert_eq!(t.sent, 1);
        srv.abort();
    }
}
