//! `loadgen`: the load generator and server of `cargo xtask bench`.
//!
//! Server: `loadgen serve --rr ADDR --sink ADDR [--count K]` (K pairs of ports from those). On `--rr` every connection is an echo
//! (the client sends N bytes and reads N back); on `--sink` a connection
//! is read to EOF and answered with the byte count (8 bytes, big-endian).
//!
//! Clients (each prints one JSON line):
//! - `latency --to RR --rate R --conns C --size N --secs S`: open loop. Request k is due
//!   at t0 + k/R and its latency is measured from that due time, so a stalled connection
//!   counts every request it delays (no coordinated omission).
//! - `closed --to RR --conns C --size N --secs S`: closed loop, maximum requests/s.
//! - `bulk --to SINK --bytes B`: one stream, Gbit/s.
//! - `connrate --to RR --conns C --size N --secs S`: a new connection per request; each is
//!   closed with a reset (linger 0) so the client's ephemeral ports are not held in
//!   TIME_WAIT, which would otherwise cap the rate after a few seconds.
//! - `idle --to RR --conns C --hold-ms H`: opens C connections, exchanges one request on
//!   each, holds them all for H ms, and prints `{"open": C}` once they are all up (on
//!   stderr, so a harness can measure while they are held); then exchanges one more request
//!   on each and reports how many were still `alive` after the hold.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use hdrhistogram::Histogram;
use serde_json::json;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

fn arg<T: std::str::FromStr>(args: &[String], name: &str, default: Option<T>) -> T {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .or(default)
        .unwrap_or_else(|| panic!("missing or bad {name}"))
}

fn main() {
    raise_fd_limit();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let size: usize = arg(&args, "--size", Some(1024));
    let secs: f64 = arg(&args, "--secs", Some(2.0));
    let dur = Duration::from_secs_f64(secs);
    let out = match args.first().map(String::as_str) {
        Some("serve") => {
            rt.block_on(serve(
                arg(&args, "--rr", None),
                arg(&args, "--sink", None),
                arg(&args, "--count", Some(1)),
                size,
            ));
            return;
        }
        Some("latency") => latency(
            arg(&args, "--to", None),
            arg(&args, "--rate", Some(1000.0)),
            arg(&args, "--conns", Some(16)),
            size,
            dur,
        ),
        Some("closed") => rt.block_on(closed(
            arg(&args, "--to", None),
            arg(&args, "--conns", Some(16)),
            size,
            dur,
        )),
        Some("bulk") => rt.block_on(bulk(
            arg(&args, "--to", None),
            arg(&args, "--bytes", Some(1 << 30)),
        )),
        Some("idle") => rt.block_on(idle(
            arg(&args, "--to", None),
            arg(&args, "--conns", Some(10_000)),
            size,
            Duration::from_millis(arg(&args, "--hold-ms", Some(3000))),
        )),
        Some("connrate") => rt.block_on(connrate(
            arg(&args, "--to", None),
            arg(&args, "--conns", Some(4)),
            size,
            dur,
        )),
        _ => {
            eprintln!("usage: loadgen serve|latency|closed|bulk|connrate ...");
            std::process::exit(2);
        }
    };
    println!("{out}");
}

/// Serves `count` pairs of ports: rr.port + i and sink.port + i.
async fn serve(rr: SocketAddr, sink: SocketAddr, count: u16, size: usize) {
    for i in 0..count {
        let at = |a: SocketAddr| SocketAddr::new(a.ip(), a.port() + i);
        let rr = TcpListener::bind(at(rr)).await.expect("bind rr");
        let sink = TcpListener::bind(at(sink)).await.expect("bind sink");
        tokio::spawn(serve_sink(sink));
        tokio::spawn(serve_rr(rr, size));
    }
    println!("listening");
    std::future::pending::<()>().await;
}

async fn serve_sink(sink: TcpListener) {
    loop {
        let Ok((mut s, _)) = sink.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let mut buf = vec![0u8; 256 * 1024];
            let mut n = 0u64;
            while let Ok(k) = s.read(&mut buf).await {
                if k == 0 {
                    break;
                }
                n += k as u64;
            }
            let _ = s.write_all(&n.to_be_bytes()).await;
        });
    }
}

async fn serve_rr(rr: TcpListener, size: usize) {
    loop {
        let Ok((mut s, _)) = rr.accept().await else {
            continue;
        };
        let _ = s.set_nodelay(true);
        tokio::spawn(async move {
            // An echo: the client decides the message size and reads back as much as it sent.
            let mut buf = vec![0u8; size.max(64 * 1024)];
            while let Ok(n) = s.read(&mut buf).await {
                if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        });
    }
}

/// Every network step is bounded, so a stuck connection is an error, not a hang.
const STEP: Duration = Duration::from_secs(3);

async fn bounded<T>(
    f: impl std::future::Future<Output = std::io::Result<T>>,
) -> std::io::Result<T> {
    tokio::time::timeout(STEP, f).await.unwrap_or_else(|_| {
        Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "step timed out",
        ))
    })
}

async fn connect(to: SocketAddr) -> std::io::Result<TcpStream> {
    let s = bounded(TcpStream::connect(to)).await?;
    s.set_nodelay(true)?;
    Ok(s)
}

async fn round_trip(s: &mut TcpStream, buf: &mut [u8]) -> std::io::Result<()> {
    bounded(async {
        s.write_all(buf).await?;
        s.read_exact(buf).await.map(|_| ())
    })
    .await
}

/// Open loop on OS threads with blocking sockets (no runtime): tokio's timer wheel has
/// millisecond granularity, which would add up to 1 ms of schedule lag to every sample,
/// while a thread sleeping in the kernel wakes within tens of microseconds.
fn latency(
    to: SocketAddr,
    rate: f64,
    conns: usize,
    size: usize,
    dur: Duration,
) -> serde_json::Value {
    use std::io::{Read, Write};
    let total = (rate * dur.as_secs_f64()).round() as u64;
    let t0 = Instant::now() + Duration::from_millis(200);
    let errors = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = (0..conns as u64)
        .map(|c| {
            let errors = errors.clone();
            std::thread::spawn(move || {
                let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram");
                let Ok(mut s) = std::net::TcpStream::connect_timeout(&to, STEP) else {
                    errors.fetch_add(1, Ordering::Relaxed);
                    return h;
                };
                let _ = s.set_nodelay(true);
                let _ = s.set_read_timeout(Some(STEP));
                let _ = s.set_write_timeout(Some(STEP));
                let mut buf = vec![7u8; size];
                // This connection's share: requests c, c+conns, c+2*conns, ...
                let mut k = c;
                while k < total {
                    let due = t0 + Duration::from_secs_f64(k as f64 / rate);
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    if s.write_all(&buf)
                        .and_then(|()| s.read_exact(&mut buf))
                        .is_err()
                    {
                        errors.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                    let _ = h.record(due.elapsed().as_micros().max(1) as u64);
                    k += conns as u64;
                }
                h
            })
        })
        .collect();
    let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram");
    for t in threads {
        if let Ok(part) = t.join() {
            let _ = h.add(part);
        }
    }
    let elapsed = t0.elapsed().as_secs_f64().max(1e-9);
    json!({
        "workload": "latency", "requests": h.len(), "errors": errors.load(Ordering::Relaxed),
        "rps": h.len() as f64 / elapsed, "p50_us": h.value_at_quantile(0.5), "p90_us": h.value_at_quantile(0.9),
        "p99_us": h.value_at_quantile(0.99), "p999_us": h.value_at_quantile(0.999), "max_us": h.max(),
        "curve": CURVE.iter().map(|&q| json!([q, h.value_at_quantile(q)])).collect::<Vec<_>>(),
    })
}

/// The quantiles of the latency chart.
const CURVE: [f64; 12] = [
    0.5, 0.75, 0.9, 0.95, 0.98, 0.99, 0.995, 0.998, 0.999, 0.9995, 0.9998, 0.9999,
];

async fn closed(to: SocketAddr, conns: usize, size: usize, dur: Duration) -> serde_json::Value {
    let done = Arc::new(AtomicU64::new(0));
    let end = Instant::now() + dur;
    let tasks: Vec<_> = (0..conns)
        .map(|_| {
            let done = done.clone();
            tokio::spawn(async move {
                let Ok(mut s) = connect(to).await else { return };
                let mut buf = vec![7u8; size];
                while Instant::now() < end && round_trip(&mut s, &mut buf).await.is_ok() {
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    let start = Instant::now();
    for t in tasks {
        let _ = t.await;
    }
    let n = done.load(Ordering::Relaxed);
    json!({"workload": "closed", "requests": n, "rps": n as f64 / start.elapsed().as_secs_f64()})
}

async fn bulk(to: SocketAddr, bytes: u64) -> serde_json::Value {
    let start = Instant::now();
    let transfer = async {
        let mut s = connect(to).await?;
        let buf = vec![7u8; 256 * 1024];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            s.write_all(&buf[..n]).await?;
            left -= n as u64;
        }
        s.shutdown().await?;
        let mut count = [0u8; 8];
        s.read_exact(&mut count).await?;
        Ok(u64::from_be_bytes(count))
    };
    let result: std::io::Result<u64> = tokio::time::timeout(Duration::from_secs(60), transfer)
        .await
        .unwrap_or_else(|_| {
            Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "bulk transfer timed out",
            ))
        });
    let secs = start.elapsed().as_secs_f64();
    match result {
        Ok(n) => json!({"workload": "bulk", "bytes": n, "gbit_s": n as f64 * 8.0 / secs / 1e9}),
        Err(e) => json!({"workload": "bulk", "bytes": 0, "gbit_s": 0.0, "error": e.to_string()}),
    }
}

async fn connrate(to: SocketAddr, conns: usize, size: usize, dur: Duration) -> serde_json::Value {
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let end = Instant::now() + dur;
    let tasks: Vec<_> = (0..conns)
        .map(|_| {
            let (done, errors) = (done.clone(), errors.clone());
            tokio::spawn(async move {
                let mut buf = vec![7u8; size];
                while Instant::now() < end {
                    let ok = async {
                        let mut s = connect(to).await?;
                        round_trip(&mut s, &mut buf).await?;
                        // Linger 0 with a zero timeout never blocks: the close is a reset.
                        socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO))
                    }
                    .await;
                    match ok {
                        Ok(()) => done.fetch_add(1, Ordering::Relaxed),
                        Err(_) => errors.fetch_add(1, Ordering::Relaxed),
                    };
                }
            })
        })
        .collect();
    let start = Instant::now();
    for t in tasks {
        let _ = t.await;
    }
    let n = done.load(Ordering::Relaxed);
    json!({"workload": "connrate", "connections": n, "errors": errors.load(Ordering::Relaxed),
           "per_s": n as f64 / start.elapsed().as_secs_f64()})
}

async fn idle(to: SocketAddr, conns: usize, size: usize, hold: Duration) -> serde_json::Value {
    let mut open = Vec::with_capacity(conns);
    let mut errors = 0u64;
    let mut first_error = None;
    let mut buf = vec![7u8; size];
    for _ in 0..conns {
        let r = async {
            let mut s = connect(to).await?;
            round_trip(&mut s, &mut buf).await?;
            Ok::<_, std::io::Error>(s)
        }
        .await;
        match r {
            Ok(s) => open.push(s),
            Err(e) => {
                errors += 1;
                first_error.get_or_insert_with(|| e.to_string());
            }
        }
    }
    eprintln!(
        "{}",
        json!({"open": open.len(), "errors": errors, "first_error": first_error})
    );
    tokio::time::sleep(hold).await;
    let mut alive = 0usize;
    let mut first_lost = None;
    for s in &mut open {
        match round_trip(s, &mut buf).await {
            Ok(_) => alive += 1,
            Err(e) => {
                first_lost.get_or_insert_with(|| e.to_string());
            }
        }
    }
    json!({"workload": "idle", "open": open.len(), "errors": errors, "alive": alive,
           "first_error": first_error, "first_lost": first_lost})
}

fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}
