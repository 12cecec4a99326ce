//! Copies bytes both ways between two streams (TCP or TLS), propagating half-close, and
//! counts them even when one side fails (the access log wants the numbers in every outcome).

use std::{
    io,
    sync::atomic::{AtomicU64, Ordering},
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
pub async fn pump<A, B>(initiator: A, other: B) -> Transfer
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let (mut ar, mut aw) = tokio::io::split(initiator);
    let (mut br, mut bw) = tokio::io::split(other);
    let (sent, received) = (AtomicU64::new(0), AtomicU64::new(0));
    let up = one_way(&mut ar, &mut bw, &sent);
    let down = one_way(&mut br, &mut aw, &received);
    tokio::pin!(up, down);
    let error = tokio::select! {
        e = &mut up => match e {
            Some(e) => Some(e),
            None => down.await,
        },
        e = &mut down => match e {
            Some(e) => Some(e),
            None => up.await,
        },
    };
    Transfer {
        sent: sent.load(Ordering::Relaxed),
        received: received.load(Ordering::Relaxed),
        error,
    }
}

/// Copies until EOF, then shuts down the writer so the peer sees our half-close (for TLS,
/// a close_notify followed by the TCP FIN). Counts into `total` as it goes, so the count
/// survives the other direction cutting this one short.
async fn one_way<R, W>(r: &mut R, w: &mut W, total: &AtomicU64) -> Option<io::Error>
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
            pump(c, u).await
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
            pump(c, u).await
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
