//! Driving `podapp` (the test application) inside pods.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    process::{Child, Command, Stdio},
    time::Duration,
};

use crate::{
    agent::workspace_bin,
    attempt::{Kind, Outcome, Tricks},
    node::Pod,
    proto::Summary,
};

/// A `podapp serve` process; killed on drop.
pub struct Server {
    child: Child,
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Server {
    /// Every connection the application has served so far, as it saw them.
    pub fn seen(&self) -> Vec<crate::proto::ServerView> {
        self.parsed()
    }

    /// Every HTTP request the application has received (for `serve_http`).
    pub fn seen_http(&self) -> Vec<crate::http_app::SeenRequest> {
        self.parsed()
    }

    /// The HTTP requests seen, once there are at least `n` (the application's report of
    /// a request can trail the response the client already has).
    pub fn wait_http(&self, n: usize) -> Vec<crate::http_app::SeenRequest> {
        let deadline = std::time::Instant::now() + crate::time::scaled(Duration::from_secs(10));
        loop {
            let seen = self.seen_http();
            if seen.len() >= n || std::time::Instant::now() > deadline {
                return seen;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Connections and datagrams (`record` servers) that reached the application from
    /// anyone but its own agent: each one is a way around the agent.
    pub fn direct(&self) -> Vec<String> {
        let agent_sources = [
            std::net::IpAddr::from(agent_common::AGENT_APP_SRC4),
            std::net::IpAddr::from(agent_common::AGENT_APP_SRC6),
        ];
        let seen: Vec<serde_json::Value> = self.parsed();
        seen.iter()
            .filter_map(|v| {
                if let Some(d) = v["datagram"].as_str() {
                    // The agent never sends UDP to an application.
                    return Some(format!("udp from {d}"));
                }
                let peer: SocketAddr = v["accepted"].as_str()?.parse().ok()?;
                (!agent_sources.contains(&peer.ip().to_canonical()))
                    .then(|| format!("tcp from {peer}"))
            })
            .collect()
    }

    fn parsed<T: serde::de::DeserializeOwned>(&self) -> Vec<T> {
        let lines = self.lines.lock().unwrap();
        lines
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Pod {
    /// Starts a server in this pod on each of `ports`, on both its IPv4 and IPv6 address.
    pub fn serve(&self, ports: &[u16]) -> Server {
        let mut cmd = self.command(workspace_bin("podapp"));
        cmd.arg("serve");
        for port in ports {
            cmd.arg("--listen")
                .arg(SocketAddr::new(self.ip(false), *port).to_string());
            cmd.arg("--listen")
                .arg(SocketAddr::new(self.ip(true), *port).to_string());
        }
        start_server(cmd)
    }

    /// Starts a server in this pod on each of `ports`, on the wildcard addresses (0.0.0.0 and
    /// [::]): it answers on every address the pod has, including ones added later.
    pub fn serve_any(&self, ports: &[u16]) -> Server {
        let mut cmd = self.command(workspace_bin("podapp"));
        cmd.arg("serve");
        for port in ports {
            for any in ["0.0.0.0", "::"] {
                let ip: std::net::IpAddr = any.parse().expect("wildcard address");
                cmd.arg("--listen")
                    .arg(SocketAddr::new(ip, *port).to_string());
            }
        }
        start_server(cmd)
    }

    /// Starts an HTTP/1.1 + HTTP/2 server in this pod on each port, IPv4 and IPv6.
    pub fn serve_http(&self, ports: &[u16]) -> Server {
        let mut cmd = self.command(workspace_bin("podapp"));
        cmd.arg("serve-http");
        for port in ports {
            for v6 in [false, true] {
                cmd.arg("--listen")
                    .arg(SocketAddr::new(self.ip(v6), *port).to_string());
            }
        }
        start_server(cmd)
    }

    /// The bypass suite's witness: serves on the wildcard addresses of `tcp` ports (so an
    /// address added later is covered) and records every connection and every datagram
    /// to the `udp` ports as it arrives ([`Server::direct`]).
    pub fn record(&self, tcp: &[u16], udp: &[u16]) -> Server {
        let mut cmd = self.command(workspace_bin("podapp"));
        cmd.arg("record");
        for (flag, ports) in [("--listen", tcp), ("--udp", udp)] {
            for port in ports {
                for any in ["0.0.0.0", "::"] {
                    let ip: std::net::IpAddr = any.parse().expect("wildcard address");
                    cmd.arg(flag).arg(SocketAddr::new(ip, *port).to_string());
                }
            }
        }
        start_server(cmd)
    }

    /// One `simnode::attempt` made by a process of this pod.
    pub fn attempt(&self, kind: Kind, to: SocketAddr, tricks: &Tricks) -> Outcome {
        let cmd = match tricks.uid {
            Some(uid) => {
                let mut cmd = self.command("setpriv");
                cmd.arg(format!("--reuid={uid}"))
                    .arg(format!("--regid={uid}"))
                    .args(["--clear-groups", "--"])
                    .arg(workspace_bin("podapp"));
                cmd
            }
            None => self.command(workspace_bin("podapp")),
        };
        run_attempt(cmd, kind, to, tricks)
    }

    /// Sends `requests` ("GET /a,POST /b") over one connection from this pod.
    pub fn http_client(
        &self,
        to: SocketAddr,
        requests: &str,
        h2: bool,
    ) -> crate::http_app::HttpSummary {
        self.http_client_with(to, requests, h2, &[])
    }

    /// [`Pod::http_client`], every request carrying `headers` ("name: value").
    pub fn http_client_with(
        &self,
        to: SocketAddr,
        requests: &str,
        h2: bool,
        headers: &[&str],
    ) -> crate::http_app::HttpSummary {
        let mut args: Vec<&str> = headers.iter().flat_map(|h| ["--header", h]).collect();
        if h2 {
            args.push("--h2");
        }
        self.http_client_args(to, requests, &args)
    }

    /// [`Pod::http_client`] with `podapp http-client`'s own options (`--interval-ms N`,
    /// `--body-bytes N`, `--header "k: v"`, `--h2`).
    pub fn http_client_args(
        &self,
        to: SocketAddr,
        requests: &str,
        args: &[&str],
    ) -> crate::http_app::HttpSummary {
        let mut cmd = self.command(workspace_bin("podapp"));
        cmd.arg("http-client")
            .arg("--to")
            .arg(to.to_string())
            .args(["--requests", requests])
            .args(args);
        let out = cmd.output().expect("run podapp http-client");
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "http-client printed no summary ({e}): {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
    }

    /// Runs `podapp client` in this pod (its cgroup and netns) and returns its summary.
    pub fn client(&self, to: SocketAddr, extra: &[&str]) -> Summary {
        let mut cmd = self.command(workspace_bin("podapp"));
        cmd.arg("client")
            .arg("--to")
            .arg(to.to_string())
            .args(extra);
        run_client(cmd)
    }

    /// Starts `podapp client` in this pod without waiting for it.
    pub fn client_spawn(&self, to: SocketAddr, extra: &[&str]) -> Child {
        let mut cmd = self.command(workspace_bin("podapp"));
        cmd.arg("client")
            .arg("--to")
            .arg(to.to_string())
            .args(extra);
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        cmd.spawn().expect("spawn podapp client")
    }
}

impl crate::Node {
    /// Runs `podapp client` on the node itself (host namespace, outside every pod): a
    /// kubelet probe, or any client outside the mesh. Its source is the node's address.
    pub fn host_client(&self, to: SocketAddr, extra: &[&str]) -> Summary {
        let mut cmd = Command::new(workspace_bin("podapp"));
        cmd.arg("client")
            .arg("--to")
            .arg(to.to_string())
            .args(extra);
        run_client(cmd)
    }
}

impl crate::Node {
    /// One `simnode::attempt` made from the node, outside every pod.
    pub fn host_attempt(&self, kind: Kind, to: SocketAddr, tricks: &Tricks) -> Outcome {
        run_attempt(Command::new(workspace_bin("podapp")), kind, to, tricks)
    }
}

fn run_attempt(mut cmd: Command, kind: Kind, to: SocketAddr, tricks: &Tricks) -> Outcome {
    let kind_arg = serde_json::to_value(kind).expect("a kind is a string");
    cmd.arg("attempt")
        .args(["--kind", kind_arg.as_str().unwrap_or_default()])
        .args(["--to", &to.to_string()]);
    if let Some(mark) = tricks.mark {
        cmd.args(["--mark", &mark.to_string()]);
    }
    if let Some(bind) = tricks.bind {
        cmd.args(["--bind", &bind.to_string()]);
    }
    let out = cmd.output().expect("run podapp attempt");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "podapp attempt {kind:?} printed no outcome ({e}): {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// Waits for a spawned client and parses its summary.
pub fn client_result(child: Child) -> Summary {
    let out = child.wait_with_output().expect("wait podapp client");
    parse_summary(&out.stdout, &out.stderr)
}

fn run_client(mut cmd: Command) -> Summary {
    let out = cmd.output().expect("run podapp client");
    parse_summary(&out.stdout, &out.stderr)
}

fn parse_summary(stdout: &[u8], stderr: &[u8]) -> Summary {
    let text = String::from_utf8_lossy(stdout);
    serde_json::from_str(text.trim()).unwrap_or_else(|e| {
        panic!(
            "podapp client printed no summary ({e}): stdout={text:?} stderr={:?}",
            String::from_utf8_lossy(stderr)
        )
    })
}

/// Starts a server command and waits until it has bound its sockets.
pub fn start_server(mut cmd: Command) -> Server {
    cmd.stdout(Stdio::piped()).stderr(Stdio::inherit());
    let mut child = cmd.spawn().expect("spawn podapp serve");
    let stdout = child.stdout.take().expect("server stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = lines.clone();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        let first = lines.next().and_then(Result::ok);
        let _ = tx.send(first);
        for line in lines.map_while(Result::ok) {
            sink.lock().unwrap().push(line);
        }
    });
    match rx.recv_timeout(Duration::from_secs(10)) {
        Ok(Some(l)) if l == "listening" => Server { child, lines },
        other => {
            let _ = child.kill();
            panic!("podapp serve did not start: {other:?}");
        }
    }
}
