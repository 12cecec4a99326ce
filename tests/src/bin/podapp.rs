//! `podapp`: the plain, unmodified application the tests run inside pods.
//!
//! `podapp serve --listen ADDR [--listen ADDR...]` prints `listening` once bound, then
//! serves the protocol of `simnode::proto` until killed.
//! `podapp client --to ADDR --send N --reply M [--count C] [--concurrency K] [--bind ADDR]
//! [--mark M] [--hold-ms H] [--v6-socket]` makes C connections, K at a time (all K
//! connected before any sends), and prints a JSON `Summary` line.
//! `podapp record --listen ADDR... [--udp ADDR...]` serves like `serve` but also prints a
//! line for every accepted connection (`{"accepted": PEER}`) and every UDP datagram
//! (`{"datagram": PEER}`), before anything is read: the bypass suite's witness.
//! `podapp attempt --kind K --to ADDR [--mark M] [--bind ADDR]` makes one attempt of
//! `simnode::attempt` and prints its JSON `Outcome`.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use sha2::{Digest, Sha256};
use simnode::proto::{self, ConnResult, Pattern, ServerView, Summary};
use socket2::{Domain, Protocol, SockRef, Socket, Type};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{TcpListener, TcpStream},
    sync::Barrier,
};

const CHUNK: usize = 64 * 1024;
/// Bound on every connection so a broken interception fails the test instead of hanging it.
const CONN_DEADLINE: Duration = Duration::from_secs(60);

fn arg<T: std::str::FromStr>(args: &[String], name: &str) -> Option<T> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("bad value for {name}: {v}"))
        })
}

fn main() {
    raise_fd_limit();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    match args.first().map(String::as_str) {
        Some("serve") => rt.block_on(serve(&args, false)),
        Some("record") => {
            for udp in args.windows(2).filter(|w| w[0] == "--udp") {
                record_udp(udp[1].parse().expect("--udp ADDR"));
            }
            rt.block_on(serve(&args, true))
        }
        Some("attempt") => {
            let kind = arg(&args, "--kind").expect("--kind K");
            let to = arg(&args, "--to").expect("--to ADDR");
            let tricks = simnode::attempt::Tricks {
                mark: arg(&args, "--mark"),
                bind: arg(&args, "--bind"),
                uid: None,
            };
            let outcome = simnode::attempt::run(kind, to, &tricks);
            println!("{}", serde_json::to_string(&outcome).unwrap());
        }
        Some("client") => rt.block_on(client(&args)),
        Some("serve-http") => {
            let addrs = args
                .windows(2)
                .filter(|w| w[0] == "--listen")
                .map(|w| w[1].parse().expect("--listen ADDR"))
                .collect();
            rt.block_on(simnode::http_app::serve(addrs))
        }
        Some("http-client") => {
            let to: SocketAddr = arg(&args, "--to").expect("--to ADDR");
            let list: String = arg(&args, "--requests").expect("--requests 'GET /a,POST /b'");
            let requests: Vec<(String, String)> = list
                .split(',')
                .filter_map(|r| r.trim().split_once(' '))
                .map(|(m, p)| (m.to_string(), p.to_string()))
                .collect();
            let options = simnode::http_app::ClientOptions {
                h2: args.iter().any(|a| a == "--h2"),
                headers: args
                    .windows(2)
                    .filter(|w| w[0] == "--header")
                    .filter_map(|w| w[1].split_once(':'))
                    .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                    .collect(),
                interval: arg(&args, "--interval-ms").map(std::time::Duration::from_millis),
                body_bytes: arg(&args, "--body-bytes"),
            };
            let summary = rt.block_on(simnode::http_app::client(to, &requests, &options));
            println!("{}", serde_json::to_string(&summary).unwrap());
        }
        _ => {
            eprintln!("usage: podapp serve --listen ADDR... | podapp client --to ADDR ...");
            std::process::exit(2);
        }
    }
}

/// Prints a line per datagram on `addr` and echoes it, on a thread of its own.
fn record_udp(addr: SocketAddr) {
    let sock = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP)).unwrap();
    if addr.is_ipv6() {
        // Both wildcards are bound, so each family has its own socket.
        sock.set_only_v6(true).unwrap();
    }
    sock.bind(&addr.into())
        .unwrap_or_else(|e| panic!("bind udp {addr}: {e}"));
    let s: std::net::UdpSocket = sock.into();
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = s.recv_from(&mut buf) {
            println!("{}", serde_json::json!({ "datagram": from.to_string() }));
            let _ = s.send_to(&buf[..n], from);
        }
    });
}

async fn serve(args: &[String], announce: bool) {
    let addrs: Vec<SocketAddr> = args
        .windows(2)
        .filter(|w| w[0] == "--listen")
        .map(|w| w[1].parse().expect("--listen ADDR"))
        .collect();
    let mut tasks = Vec::new();
    for addr in addrs {
        let sock =
            Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP)).unwrap();
        sock.set_reuse_address(true).unwrap();
        if addr.is_ipv6() {
            sock.set_only_v6(true).unwrap();
        }
        sock.bind(&addr.into())
            .unwrap_or_else(|e| panic!("bind {addr}: {e}"));
        sock.listen(4096).unwrap();
        sock.set_nonblocking(true).unwrap();
        let l = TcpListener::from_std(sock.into()).unwrap();
        tasks.push(tokio::spawn(async move {
            loop {
                let Ok((s, peer)) = l.accept().await else {
                    continue;
                };
                if announce {
                    println!("{}", serde_json::json!({ "accepted": peer.to_string() }));
                }
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(
                        simnode::time::scaled(CONN_DEADLINE),
                        serve_one(s, peer),
                    )
                    .await;
                });
            }
        }));
    }
    println!("listening");
    for t in tasks {
        let _ = t.await;
    }
}

async fn serve_one(s: TcpStream, peer: SocketAddr) -> std::io::Result<()> {
    let local = s.local_addr()?;
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).await?;
    let Some((send, reply, seed)) = proto::parse_request(&line) else {
        return Ok(());
    };
    // Exactly the announced bytes: clients that half-close and clients that cannot (an
    // `openssl s_client`) both get their answer.
    let (got, sha) = drain_hashed(&mut (&mut r).take(send)).await?;
    let view = ServerView {
        peer: peer.to_string(),
        local: local.to_string(),
        got,
        sha,
    };
    // One line per connection on stdout: what the application itself saw.
    println!("{}", serde_json::to_string(&view).unwrap_or_default());
    let mut s = r.into_inner();
    s.write_all(proto::response_line(&view).as_bytes()).await?;
    write_pattern(&mut s, seed.wrapping_add(1), reply).await?;
    s.shutdown().await
}

/// Reads to EOF; returns the byte count and the SHA-256 of what was read.
async fn drain_hashed<R: tokio::io::AsyncRead + Unpin>(
    r: &mut R,
) -> std::io::Result<(u64, String)> {
    let mut h = Sha256::new();
    let mut got = 0u64;
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            return Ok((got, proto::hex(&h.finalize())));
        }
        h.update(&buf[..n]);
        got += n as u64;
    }
}

async fn write_pattern(s: &mut TcpStream, seed: u64, len: u64) -> std::io::Result<()> {
    let mut p = Pattern::new(seed);
    let mut buf = vec![0u8; CHUNK];
    let mut left = len;
    while left > 0 {
        let n = left.min(CHUNK as u64) as usize;
        p.fill(&mut buf[..n]);
        s.write_all(&buf[..n]).await?;
        left -= n as u64;
    }
    Ok(())
}

struct ClientOpts {
    to: SocketAddr,
    send: u64,
    reply: u64,
    bind: Option<SocketAddr>,
    mark: Option<u32>,
    hold: Duration,
    v6_socket: bool,
}

async fn client(args: &[String]) {
    let opts = Arc::new(ClientOpts {
        to: arg(args, "--to").expect("--to ADDR"),
        send: arg(args, "--send").unwrap_or(5),
        reply: arg(args, "--reply").unwrap_or(5),
        bind: arg(args, "--bind"),
        mark: arg(args, "--mark"),
        hold: Duration::from_millis(arg(args, "--hold-ms").unwrap_or(0)),
        v6_socket: args.iter().any(|a| a == "--v6-socket"),
    });
    let count: usize = arg(args, "--count").unwrap_or(1);
    let concurrency: usize = arg(args, "--concurrency").unwrap_or(1).max(1);
    let mut summary = Summary::default();
    let mut done = 0;
    let mut seed: u64 = arg(args, "--seed").unwrap_or(1);
    while done < count {
        let batch = concurrency.min(count - done);
        let barrier = Arc::new(Barrier::new(batch));
        let tasks: Vec<_> = (0..batch)
            .map(|_| {
                seed += 1;
                let (o, b, s) = (opts.clone(), barrier.clone(), seed);
                tokio::spawn(async move {
                    match tokio::time::timeout(simnode::time::scaled(CONN_DEADLINE), one(&o, &b, s))
                        .await
                    {
                        Ok(r) => r,
                        Err(_) => ConnResult {
                            to: o.to.to_string(),
                            error: Some("timed out".into()),
                            ..Default::default()
                        },
                    }
                })
            })
            .collect();
        for t in tasks {
            let r = t.await.expect("client task");
            if r.ok() {
                summary.ok += 1;
            } else {
                summary.failed += 1;
                if summary.errors.len() < 10 {
                    summary
                        .errors
                        .push(r.error.clone().unwrap_or_else(|| "bytes differ".into()));
                }
            }
            if count <= 50 {
                summary.results.push(r);
            }
        }
        done += batch;
    }
    println!("{}", serde_json::to_string(&summary).unwrap());
}

/// One exchange. Connect errors are reported after the barrier so a batch never deadlocks.
async fn one(o: &ClientOpts, barrier: &Barrier, seed: u64) -> ConnResult {
    let mut res = ConnResult {
        to: o.to.to_string(),
        ..Default::default()
    };
    let conn = connect(o).await;
    barrier.wait().await;
    let mut s = match conn {
        Ok(s) => s,
        Err(e) => {
            res.error = Some(format!("connect: {e}"));
            return res;
        }
    };
    res.local = s.local_addr().map(|a| a.to_string()).unwrap_or_default();
    let started = Instant::now();
    if let Err(e) = exchange(&mut s, o, seed, &mut res).await {
        res.error = Some(format!("{e} after {:?}", started.elapsed()));
    }
    res
}

async fn connect(o: &ClientOpts) -> std::io::Result<TcpStream> {
    let domain = if o.v6_socket {
        Domain::IPV6
    } else {
        Domain::for_address(o.to)
    };
    let sock = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?;
    if let Some(mark) = o.mark {
        sock.set_mark(mark)?;
    }
    if let Some(bind) = o.bind {
        sock.set_reuse_address(true)?;
        sock.bind(&bind.into())?;
    }
    sock.set_nonblocking(true)?;
    let to: SocketAddr = match (o.v6_socket, o.to) {
        (true, SocketAddr::V4(v4)) => SocketAddr::new(v4.ip().to_ipv6_mapped().into(), v4.port()),
        (_, a) => a,
    };
    let sock = tokio::net::TcpSocket::from_std_stream(sock.into());
    sock.connect(to).await
}

async fn exchange(
    s: &mut TcpStream,
    o: &ClientOpts,
    seed: u64,
    res: &mut ConnResult,
) -> std::io::Result<()> {
    if !o.hold.is_zero() {
        tokio::time::sleep(o.hold).await;
    }
    s.write_all(proto::request_line(o.send, o.reply, seed).as_bytes())
        .await?;
    write_pattern(s, seed, o.send).await?;
    // Half-close: the reply must still arrive in full.
    SockRef::from(&*s).shutdown(std::net::Shutdown::Write)?;
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).await?;
    let view = proto::parse_response(&line)
        .ok_or_else(|| std::io::Error::other(format!("bad response line {line:?}")))?;
    res.sent_ok = view.got == o.send && view.sha == Pattern::sha(seed, o.send);
    res.server = Some(view);
    let (got, sha) = drain_hashed(&mut r).await?;
    res.reply_ok = got == o.reply && sha == Pattern::sha(seed.wrapping_add(1), o.reply);
    Ok(())
}

fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}
