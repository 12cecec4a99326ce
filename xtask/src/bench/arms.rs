//! The arms of the bench: what runs between the client pod and the server pod.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use simnode::{pki::Svid, workspace_bin, Agent, AgentConfig, Node, Pod};

use super::{RR_PORT, SINK_PORT};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arm {
    /// Client pod to server pod, nothing in between.
    Direct,
    /// The agent proxying plaintext, reached through an iptables REDIRECT in the client pod.
    Iptables,
    /// The agent proxying plaintext, reached through the connect-time eBPF redirect, with
    /// the splice off.
    Ebpf,
    /// `Ebpf` with the sock_ops/sk_msg splice of the app-to-agent loopback hop.
    EbpfSkmsg,
    /// Both pods enrolled: mutual TLS between the agent's two legs.
    Mtls,
    /// Debian's haproxy in both pods doing the same mutual TLS (a reference we did not write).
    HaproxyMtls,
}

pub const ALL: [Arm; 6] = [
    Arm::Direct,
    Arm::Iptables,
    Arm::Ebpf,
    Arm::EbpfSkmsg,
    Arm::Mtls,
    Arm::HaproxyMtls,
];

/// The mark the agent puts on its upstream sockets in the iptables arm, so the REDIRECT
/// rule lets them through (Istio matches its proxy's uid instead; here everything is root).
const UPSTREAM_MARK: u32 = 1337;
/// haproxy's ports: client-side frontends on the client pod's loopback, TLS frontends on
/// the server pod's address.
const HAPROXY_RR: u16 = 17000;
const HAPROXY_SINK: u16 = 17001;
const HAPROXY_TLS_RR: u16 = 17443;
const HAPROXY_TLS_SINK: u16 = 17444;

impl Arm {
    pub fn name(self) -> &'static str {
        match self {
            Arm::Direct => "direct",
            Arm::Iptables => "iptables",
            Arm::Ebpf => "ebpf",
            Arm::EbpfSkmsg => "ebpf+skmsg",
            Arm::Mtls => "mtls",
            Arm::HaproxyMtls => "haproxy-mtls",
        }
    }

    pub fn parse(name: &str) -> Result<Arm> {
        ALL.into_iter().find(|a| a.name() == name).with_context(|| {
            let names: Vec<_> = ALL.iter().map(|a| a.name()).collect();
            format!(
                "unknown arm `{name}` (expected one of {})",
                names.join(", ")
            )
        })
    }
}

/// An arm set up and ready for traffic; dropping it tears the arm down.
pub struct Running {
    /// Client side first.
    agents: Vec<Agent>,
    procs: Vec<Child>,
    /// Each proxy's core for the throughput workloads: the client side's proxy on CPU 1
    /// (its own core), a server side's proxy on CPU 0 with the server and load generator.
    pub cpus: Vec<(u32, u32)>,
    iptables: Option<IptablesRule>,
    /// Where the load generator sends request/response and bulk traffic.
    pub rr: SocketAddr,
    pub sink: SocketAddr,
}

impl Running {
    /// The processes doing the proxying (their CPU and memory are the arm's cost), the
    /// client side's first.
    pub fn pids(&self) -> Vec<u32> {
        self.cpus.iter().map(|(pid, _)| *pid).collect()
    }

    /// Stops the proxies; an agent that does not stop cleanly is an error.
    pub fn stop(mut self, arm: Arm) -> Result<()> {
        self.kill_procs();
        for a in &mut self.agents {
            ensure!(
                a.stop().success(),
                "agent did not stop cleanly in arm {}",
                arm.name()
            );
        }
        Ok(())
    }
}

impl Running {
    /// haproxy has no clean-stop contract to check: killed (idempotent).
    fn kill_procs(&mut self) {
        for mut p in self.procs.drain(..) {
            let _ = p.kill();
            let _ = p.wait();
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.kill_procs();
        self.iptables.take();
    }
}

pub struct Ids<'a> {
    pub client: &'a Svid,
    pub server: &'a Svid,
    pub mesh: &'a str,
}

/// The server's ports for `arm` (see [`RR_PORT`]).
fn ports(arm: Arm) -> (u16, u16) {
    let i = ALL.iter().position(|a| *a == arm).unwrap_or(0) as u16;
    (RR_PORT + i, SINK_PORT + i)
}

pub fn start(arm: Arm, node: &Node, ids: &Ids) -> Result<Running> {
    let (client, server) = (node.pod("client"), node.pod("server"));
    let (rr, sink) = ports(arm);
    let direct = |agents: Vec<(Agent, u32)>, iptables: Option<IptablesRule>| Running {
        cpus: agents
            .iter()
            .filter_map(|(a, cpu)| Some((a.pid()?, *cpu)))
            .collect(),
        agents: agents.into_iter().map(|(a, _)| a).collect(),
        procs: Vec::new(),
        iptables,
        rr: SocketAddr::new(server.ip(false), rr),
        sink: SocketAddr::new(server.ip(false), sink),
    };
    Ok(match arm {
        Arm::Direct => direct(Vec::new(), None),
        Arm::Ebpf => direct(
            vec![(
                agent(AgentConfig::new(node).pod_extra(client, "open", "accelerate = false")),
                1,
            )],
            None,
        ),
        Arm::EbpfSkmsg => direct(
            vec![(
                agent(AgentConfig::new(node).pod_extra(client, "open", "accelerate = true")),
                1,
            )],
            None,
        ),
        Arm::Iptables => {
            let a = agent(
                AgentConfig::new(node)
                    .set(&format!("upstream_mark = {UPSTREAM_MARK}"))
                    .pod_extra(client, "open", "redirect = \"iptables\""),
            );
            let rule = IptablesRule::add(client, ids.mesh)?;
            direct(vec![(a, 1)], Some(rule))
        }
        Arm::Mtls => {
            // Two agents, as on two nodes: one per pod.
            let client_side = agent(AgentConfig::new(node).mesh().pod_extra(
                client,
                "open",
                &ids.client.toml(),
            ));
            let server_side = agent(AgentConfig::another(node, "server-side").mesh().pod_extra(
                server,
                "open",
                &ids.server.toml(),
            ));
            direct(vec![(client_side, 1), (server_side, 0)], None)
        }
        Arm::HaproxyMtls => haproxy(node, ids)?,
    })
}

/// The agent as an operator runs it: info level (one access-log line per connection), no
/// kernel debug events.
fn agent(cfg: AgentConfig) -> Agent {
    let mut cmd = Command::new("taskset");
    cmd.args(["-c", "1"]).arg(workspace_bin("agent"));
    Agent::start_cmd(cmd, &cfg.log_level("info"))
}

/// What istio-init does, with a mark instead of a uid owner match: every TCP connect from
/// the pod to the mesh goes to the agent's outbound port, except the agent's own.
struct IptablesRule {
    netns: std::path::PathBuf,
    spec: Vec<String>,
}

impl IptablesRule {
    fn add(pod: &Pod, mesh: &str) -> Result<IptablesRule> {
        let spec: Vec<String> = [
            "OUTPUT",
            "-t",
            "nat",
            "-p",
            "tcp",
            "-d",
            mesh,
            "-m",
            "mark",
            "!",
            "--mark",
            &UPSTREAM_MARK.to_string(),
            "-j",
            "REDIRECT",
            "--to-ports",
            "15001",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let rule = IptablesRule {
            netns: pod.netns_path.clone(),
            spec,
        };
        rule.iptables("-A")?;
        Ok(rule)
    }

    fn iptables(&self, op: &str) -> Result<()> {
        let out = simnode::command_in(None, Some(&self.netns), "iptables")
            .arg(op)
            .args(&self.spec)
            .output()
            .context("run iptables (apt install iptables; `cargo xtask setup` does)")?;
        ensure!(
            out.status.success(),
            "iptables {op} {}: {}",
            self.spec.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(())
    }
}

impl Drop for IptablesRule {
    fn drop(&mut self) {
        let _ = self.iptables("-D");
    }
}

/// haproxy in each pod (maxconn fits RLIMIT_NOFILE 20,000: two descriptors per connection), one thread each, pinned to the agent's core: the client pod's
/// instance takes plaintext on its loopback and originates mutual TLS to the server pod's,
/// which terminates it and forwards to the server. TLS 1.3 only, certificates verified
/// against the same bundle, no session resumption (the agent does none either).
fn haproxy(node: &Node, ids: &Ids) -> Result<Running> {
    let (client, server) = (node.pod("client"), node.pod("server"));
    let dir = node.tmp().join("haproxy");
    std::fs::create_dir_all(&dir)?;
    let pem = |svid: &Svid, name: &str| -> Result<String> {
        let path = dir.join(name);
        let mut both = std::fs::read(svid.cert())?;
        both.extend(std::fs::read(svid.key())?);
        std::fs::write(&path, both)?;
        Ok(path.display().to_string())
    };
    let (client_pem, server_pem) = (
        pem(ids.client, "client.pem")?,
        pem(ids.server, "server.pem")?,
    );
    let bundle = ids.client.bundle().display().to_string();
    let sip = server.ip(false);
    let head = "global\n  nbthread 1\n  maxconn 9000\n  ssl-default-bind-options ssl-min-ver TLSv1.3\n  ssl-default-server-options ssl-min-ver TLSv1.3\ndefaults\n  mode tcp\n  timeout connect 3s\n  timeout client 60s\n  timeout server 60s\n";
    let mut client_cfg = head.to_string();
    let mut server_cfg = head.to_string();
    let (rr, sink) = ports(Arm::HaproxyMtls);
    for (name, local, tls, app) in [
        ("rr", HAPROXY_RR, HAPROXY_TLS_RR, rr),
        ("sink", HAPROXY_SINK, HAPROXY_TLS_SINK, sink),
    ] {
        client_cfg.push_str(&format!(
            "listen {name}\n  bind 127.0.0.1:{local}\n  server up {sip}:{tls} ssl crt {client_pem} ca-file {bundle} verify required no-ssl-reuse\n"
        ));
        server_cfg.push_str(&format!(
            "listen {name}\n  bind {sip}:{tls} ssl crt {server_pem} ca-file {bundle} verify required\n  server app {sip}:{app}\n"
        ));
    }
    let mut procs = Vec::new();
    let mut cpus = Vec::new();
    for (pod, cfg, name, cpu) in [
        (client, client_cfg, "client.cfg", 1),
        (server, server_cfg, "server.cfg", 0),
    ] {
        let path = dir.join(name);
        std::fs::write(&path, cfg)?;
        let check = Command::new("haproxy")
            .args(["-c", "-q", "-f"])
            .arg(&path)
            .output()
            .context("run haproxy (apt install haproxy; `cargo xtask setup` does)")?;
        ensure!(
            check.status.success(),
            "haproxy rejected {}: {}",
            path.display(),
            String::from_utf8_lossy(&check.stderr)
        );
        let log = std::fs::File::create(super::out_dir().join(format!("haproxy-{name}.log")))?;
        let mut cmd = pod.command("taskset");
        cmd.args(["-c", &cpu.to_string(), "haproxy", "-db", "-f"])
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(log);
        let child = cmd.spawn().context("spawn haproxy")?;
        cpus.push((child.id(), cpu));
        procs.push(child);
    }
    let rr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), HAPROXY_RR);
    let running = Running {
        agents: Vec::new(),
        cpus,
        procs,
        iptables: None,
        rr,
        sink: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), HAPROXY_SINK),
    };
    wait_listening(client, rr)?;
    wait_listening(server, SocketAddr::new(sip, HAPROXY_TLS_RR))?;
    Ok(running)
}

fn wait_listening(pod: &Pod, addr: SocketAddr) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        let up = pod
            .in_netns(move || {
                std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
            })
            .join()
            .unwrap_or(false);
        if up {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!(
        "nothing listens on {addr} in pod {} after 5 s (see {}/haproxy-*.log)",
        pod.name,
        super::out_dir().display()
    )
}
