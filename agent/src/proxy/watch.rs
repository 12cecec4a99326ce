//! Deadlines hyper cannot keep for an inspected HTTP connection: the idle timeout (no byte
//! either way), and for HTTP/2 the header deadline (hyper's `header_read_timeout` is
//! HTTP/1 only, so an HTTP/2 client could trickle a HEADERS or CONTINUATION frame forever).
//!
//! [`Watched`] wraps the connection's stream and follows the client's HTTP/2 framing just
//! far enough to know when a header block is unfinished: from the first byte of a frame
//! header, of a HEADERS, PUSH_PROMISE or CONTINUATION payload, or of a header block not yet
//! ended by END_HEADERS, until it is complete. [`Watch::expired`] resolves when that lasts
//! longer than the header timeout, or when nothing moves for the idle timeout. An idle
//! HTTP/2 connection between requests is not pending and stays open.

use std::{
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    sync::Notify,
};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADERS: u8 = 0x1;
const PUSH_PROMISE: u8 = 0x5;
const CONTINUATION: u8 = 0x9;
const END_HEADERS: u8 = 0x4;
/// "Not pending" in [`Shared::pending_since`].
const NONE: u64 = u64::MAX;

/// Where the client's byte stream is in the HTTP/2 framing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Matching the connection preface; so many bytes matched so far.
    Preface(usize),
    /// Reading a 9-byte frame header.
    Header([u8; 9], usize),
    /// Reading a frame's payload.
    Payload { left: u32, kind: u8, flags: u8 },
    /// Not HTTP/2: hyper's own HTTP/1 timer applies.
    Off,
}

#[derive(Debug)]
struct Tracker {
    phase: Phase,
    /// A HEADERS or PUSH_PROMISE without END_HEADERS, awaiting its CONTINUATION.
    block_open: bool,
}

impl Tracker {
    fn new() -> Self {
        Self {
            phase: Phase::Preface(0),
            block_open: false,
        }
    }

    fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            match &mut self.phase {
                Phase::Off => return,
                Phase::Preface(matched) => {
                    let want = &PREFACE[*matched..];
                    let n = want.len().min(data.len());
                    if data[..n] != want[..n] {
                        self.phase = Phase::Off;
                        return;
                    }
                    *matched += n;
                    data = &data[n..];
                    if *matched == PREFACE.len() {
                        self.phase = Phase::Header([0; 9], 0);
                    }
                }
                Phase::Header(buf, have) => {
                    let n = (9 - *have).min(data.len());
                    buf[*have..*have + n].copy_from_slice(&data[..n]);
                    *have += n;
                    data = &data[n..];
                    if *have == 9 {
                        // The length is 24 bits, big-endian (network order).
                        let left = u32::from_be_bytes([0, buf[0], buf[1], buf[2]]);
                        let (kind, flags) = (buf[3], buf[4]);
                        self.phase = Phase::Payload { left, kind, flags };
                        if left == 0 {
                            self.frame_done(kind, flags);
                        }
                    }
                }
                Phase::Payload { left, kind, flags } => {
                    let n = (*left as usize).min(data.len());
                    *left -= n as u32;
                    data = &data[n..];
                    if *left == 0 {
                        let (kind, flags) = (*kind, *flags);
                        self.frame_done(kind, flags);
                    }
                }
            }
        }
    }

    fn frame_done(&mut self, kind: u8, flags: u8) {
        if matches!(kind, HEADERS | PUSH_PROMISE | CONTINUATION) {
            self.block_open = flags & END_HEADERS == 0;
        }
        self.phase = Phase::Header([0; 9], 0);
    }

    /// Whether a request head has started and not finished.
    fn pending(&self) -> bool {
        self.block_open
            || match self.phase {
                Phase::Header(_, have) => have > 0,
                Phase::Payload { kind, .. } => {
                    matches!(kind, HEADERS | PUSH_PROMISE | CONTINUATION)
                }
                Phase::Preface(_) | Phase::Off => false,
            }
    }
}

/// What the stream and its watcher share: times in ms since `start`.
#[derive(Debug)]
struct Shared {
    start: Instant,
    last_io: AtomicU64,
    pending_since: AtomicU64,
    changed: Notify,
}

impl Shared {
    fn now(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }
}

/// The connection's stream, watched.
pub struct Watched<S> {
    inner: S,
    tracker: Tracker,
    shared: Arc<Shared>,
}

/// The other half: resolves when a deadline passes.
pub struct Watch {
    shared: Arc<Shared>,
    idle: Duration,
    header: Duration,
}

/// Wraps `inner`; the [`Watch`] enforces `idle` and (HTTP/2) `header`.
pub fn watch<S>(inner: S, idle: Duration, header: Duration) -> (Watched<S>, Watch) {
    let shared = Arc::new(Shared {
        start: Instant::now(),
        last_io: AtomicU64::new(0),
        pending_since: AtomicU64::new(NONE),
        changed: Notify::new(),
    });
    (
        Watched {
            inner,
            tracker: Tracker::new(),
            shared: shared.clone(),
        },
        Watch {
            shared,
            idle,
            header,
        },
    )
}

impl Watch {
    /// Resolves with the reason once a deadline has passed.
    pub async fn expired(self) -> String {
        loop {
            let s = &self.shared;
            let changed = s.changed.notified();
            let now = s.now();
            let idle_at = s.last_io.load(Ordering::Relaxed) + self.idle.as_millis() as u64;
            if now >= idle_at {
                return format!("idle for {} s (idle_timeout_ms)", self.idle.as_secs_f64());
            }
            let mut until = idle_at;
            let since = s.pending_since.load(Ordering::Relaxed);
            if since != NONE {
                let header_at = since + self.header.as_millis() as u64;
                if now >= header_at {
                    return format!(
                        "HTTP/2 request headers not complete within {} ms (http_header_timeout_ms)",
                        self.header.as_millis()
                    );
                }
                until = until.min(header_at);
            }
            let deadline = s.start + Duration::from_millis(until);
            tokio::select! {
                () = tokio::time::sleep_until(deadline.into()) => {}
                () = changed => {}
            }
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            let this = &mut *self;
            let was = this.tracker.pending();
            this.tracker.feed(&buf.filled()[before..]);
            let now = this.shared.now();
            this.shared.last_io.store(now, Ordering::Relaxed);
            match (was, this.tracker.pending()) {
                (false, true) => {
                    this.shared.pending_since.store(now, Ordering::Relaxed);
                    this.shared.changed.notify_one();
                }
                (true, false) => this.shared.pending_since.store(NONE, Ordering::Relaxed),
                _ => {}
            }
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            let now = self.shared.now();
            self.shared.last_io.store(now, Ordering::Relaxed);
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
        let len = (payload.len() as u32).to_be_bytes();
        let mut f = vec![len[1], len[2], len[3], kind, flags, 0, 0, 0, 1];
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn a_header_block_is_pending_until_end_headers_and_idle_is_not() {
        let mut t = Tracker::new();
        t.feed(PREFACE);
        t.feed(&frame(0x4, 0, &[]));
        assert!(!t.pending(), "a connection between requests is not pending");
        let headers = frame(HEADERS, 0x1, &[0x82, 0x84]);
        t.feed(&headers[..5]);
        assert!(t.pending(), "half a frame header");
        t.feed(&headers[5..]);
        assert!(t.pending(), "HEADERS without END_HEADERS");
        let cont = frame(CONTINUATION, END_HEADERS, &[0x86]);
        t.feed(&cont[..8]);
        assert!(t.pending());
        t.feed(&cont[8..]);
        assert!(!t.pending(), "END_HEADERS ends the block");
        // A DATA frame arriving slowly is a request body, not a head.
        let data = frame(0x0, 0, &[7; 100]);
        t.feed(&data[..50]);
        assert!(!t.pending());
    }

    #[test]
    fn http1_is_left_alone() {
        let mut t = Tracker::new();
        t.feed(b"GET / HTTP/1.1\r\nhost: a\r\n");
        assert_eq!(t.phase, Phase::Off);
        assert!(!t.pending());
    }
}
