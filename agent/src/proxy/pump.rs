//! Copies bytes both ways between two streams (TCP or TLS), propagating half-close, and
//! counts them even when one side fails (the access log wants the numbers in every outcome).

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Large enough that a bulk transfer is not syscall-bound, small enough for many idle
/// connections (each direction allocates its buffer only while it runs).
const BUF: usize = 64 * 1024;

#[derive(Debug, Default)]
pub struct Transfer {
    /// From the connection's initiator to the other side.
    pub sent: u64,
    /// Back to the initiator.
    pub received: u64,
    /// The first error seen, if any.
    pub error: Option<io::Error>,
}

/// Runs until both directions have finished. `initiator` is the side that connected.
pub async fn pump<A, B>(initiator: A, other: B) -> Transfer
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let (mut ar, mut aw) = tokio::io::split(initiator);
    let (mut br, mut bw) = tokio::io::split(other);
    let (up, down) = tokio::join!(one_way(&mut ar, &mut bw), one_way(&mut br, &mut aw));
    Transfer {
        sent: up.0,
        received: down.0,
        error: up.1.or(down.1),
    }
}

/// Copies until EOF, then shuts down the writer so the peer sees our half-close (for TLS,
/// a close_notify followed by the TCP FIN).
async fn one_way<R, W>(r: &mut R, w: &mut W) -> (u64, Option<io::Error>)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; BUF];
    let mut total = 0u64;
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) => return (total, Some(e)),
        };
        if let Err(e) = w.write_all(&buf[..n]).await {
            return (total, Some(e));
        }
        total += n as u64;
    }
    if let Err(e) = w.shutdown().await {
        // The peer may already be gone; the bytes were delivered to its socket anyway.
        if e.kind() != io::ErrorKind::NotConnected {
            return (total, Some(e));
        }
    }
    (total, None)
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
}
