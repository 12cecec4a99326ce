//! The bypass suite: every way we know for an application in an enrolled pod, or a peer on
//! the network, to reach a STRICT fail-closed application around the agent is tried for
//! real, and the witness is the application itself (`podapp record` prints every accepted
//! connection and every datagram before reading a byte). An attempt is blocked when the
//! application saw nothing from it, or saw it only from its own agent (so it came through
//! mutual TLS and the policy). Prints `bypass attempts: N tried, N blocked`.

mod common;

use std::{
    net::{IpAddr, SocketAddr, SocketAddrV6},
    time::{Duration, Instant},
};

use common::*;
use simnode::{
    app::Server,
    attempt::{Kind, Outcome, Tricks},
    pki::DevCa,
    Agent, AgentConfig, Node, Pod,
};

const TD: &str = "spiffe://td.test/ns/default/sa";
const APP: u16 = 8080;
/// Excluded from the client pod's interception (`exclude_ports`).
const EXCLUDED: u16 = 9999;
const UDP: u16 = 9000;
const OUTBOUND_LISTENER: u16 = 15001;
const INBOUND_LISTENER: u16 = 15006;

/// Who makes an attempt.
#[derive(Clone, Copy)]
enum From<'a> {
    /// A process in the enrolled client pod.
    Pod(&'a Pod),
    /// The node, outside every pod.
    Node,
}

struct Suite<'a> {
    node: &'a Node,
    witness: &'a Server,
    tried: usize,
    /// Attempts the application saw only through its agent.
    intercepted: usize,
    bypassed: Vec<String>,
}

impl Suite<'_> {
    /// Makes one attempt and judges it by what the application saw since the last one.
    fn attempt(&mut self, what: &str, from: From, kind: Kind, to: SocketAddr, tricks: Tricks) {
        let before = self.witness.direct().len();
        let seen_before = self.witness.seen().len();
        let o: Outcome = match from {
            From::Pod(pod) => pod.attempt(kind, to, &tricks),
            From::Node => self.node.host_attempt(kind, to, &tricks),
        };
        // A datagram or a connection is printed on arrival; give it time to be read.
        std::thread::sleep(Duration::from_millis(150));
        self.tried += 1;
        let direct = self.witness.direct();
        if direct.len() > before {
            self.bypassed
                .push(format!("{what}: {:?} ({o:?})", &direct[before..]));
        } else if self.witness.seen().len() > seen_before {
            self.intercepted += 1;
        } else if o.answered {
            // Something other than the application answered the request.
            self.bypassed.push(format!(
                "{what}: answered, but not by the application ({o:?})"
            ));
        }
        println!(
            "  {what}: sent {}, answered {}, {}",
            o.sent,
            o.answered,
            o.error.as_deref().unwrap_or("no error")
        );
    }
}

/// The pod's link-local IPv6 address, as seen inside it.
fn link_local(pod: &Pod) -> std::net::Ipv6Addr {
    let out = pod.ip_in(&["-6", "-o", "addr", "show", "dev", "eth0", "scope", "link"]);
    out.split_whitespace()
        .skip_while(|w| *w != "inet6")
        .nth(1)
        .and_then(|a| a.split('/').next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no link-local address in {out:?}"))
}

/// The index of the pod's eth0, inside it (the scope of a link-local destination).
fn eth0_index(pod: &Pod) -> u32 {
    let out = pod.ip_in(&["-o", "link", "show", "dev", "eth0"]);
    out.split(':')
        .next()
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no eth0 index in {out:?}"))
}

#[test]
fn nothing_reaches_a_strict_pod_around_the_agent() {
    let Some(node) = node("bypass", &["s", "c"]) else {
        return;
    };
    let (s, c) = (node.pod("s"), node.pod("c"));
    let ca = DevCa::new(&node.tmp().join("ca"));
    let ss = ca.issue(&format!("{TD}/s"), &node.tmp().join("s"), false);
    let cs = ca.issue(&format!("{TD}/c"), &node.tmp().join("c"), false);
    let allow = node.tmp().join("allow-all.yaml");
    let cfg = AgentConfig::new(&node)
        .mesh()
        .pod_extra(s, "closed", &ss.toml_strict(&allow))
        .pod_extra(
            c,
            "closed",
            &format!("exclude_ports = [{EXCLUDED}]\n{}", cs.toml()),
        );
    let mut agent = Agent::start(&cfg);
    // (The agent holds 15006 on the pod's loopback, so the application cannot bind it.)
    let witness = s.record(&[APP, EXCLUDED], &[UDP]);
    let mut suite = Suite {
        node: &node,
        witness: &witness,
        tried: 0,
        intercepted: 0,
        bypassed: Vec::new(),
    };
    let none = Tricks::default;
    let pod = From::Pod(c);

    // From an application in the enrolled client pod.
    for v6 in [false, true] {
        let app = at(s, v6, APP);
        suite.attempt("tcp", pod, Kind::Tcp, app, none());
        suite.attempt("tcp fast open", pod, Kind::FastOpen, app, none());
        suite.attempt("io_uring connect", pod, Kind::IoUring, app, none());
        suite.attempt(
            "excluded destination port",
            pod,
            Kind::Tcp,
            at(s, v6, EXCLUDED),
            none(),
        );
        suite.attempt(
            "excluded port as the source port",
            pod,
            Kind::Tcp,
            app,
            Tricks {
                bind: Some(SocketAddr::new(c.ip(v6), EXCLUDED)),
                ..none()
            },
        );
        suite.attempt(
            "SO_MARK (NET_ADMIN in the pod)",
            pod,
            Kind::Tcp,
            app,
            Tricks {
                mark: Some(1337),
                ..none()
            },
        );
        suite.attempt(
            "the proxy's uid 1337",
            pod,
            Kind::Tcp,
            app,
            Tricks {
                uid: Some(1337),
                ..none()
            },
        );
        suite.attempt("udp sendto", pod, Kind::UdpSend, at(s, v6, UDP), none());
        suite.attempt("udp connect", pod, Kind::UdpConnect, at(s, v6, UDP), none());
        suite.attempt(
            "the server's inbound listener port",
            pod,
            Kind::Tcp,
            at(s, v6, INBOUND_LISTENER),
            none(),
        );
    }
    suite.attempt(
        "tcp to an IPv4-mapped address",
        pod,
        Kind::TcpMapped,
        at(s, false, APP),
        none(),
    );
    suite.attempt(
        "udp to an IPv4-mapped address",
        pod,
        Kind::UdpMapped,
        at(s, false, UDP),
        none(),
    );
    suite.attempt(
        "raw socket UDP (NET_RAW in the pod)",
        pod,
        Kind::RawUdp,
        at(s, false, UDP),
        none(),
    );
    let ll = SocketAddr::V6(SocketAddrV6::new(link_local(s), APP, 0, eth0_index(c)));
    suite.attempt("link-local IPv6", pod, Kind::Tcp, ll, none());
    suite.attempt(
        "the agent's own outbound listener",
        pod,
        Kind::Tcp,
        sock(&format!("127.0.0.1:{OUTBOUND_LISTENER}")),
        none(),
    );

    // From the node, outside the mesh.
    for v6 in [false, true] {
        suite.attempt("tcp", From::Node, Kind::Tcp, at(s, v6, APP), none());
        suite.attempt(
            "tcp fast open",
            From::Node,
            Kind::FastOpen,
            at(s, v6, APP),
            none(),
        );
        suite.attempt(
            "udp sendto",
            From::Node,
            Kind::UdpSend,
            at(s, v6, UDP),
            none(),
        );
        suite.attempt(
            "the agent's inbound listener port",
            From::Node,
            Kind::Tcp,
            at(s, v6, INBOUND_LISTENER),
            none(),
        );
    }
    suite.attempt(
        "raw socket UDP",
        From::Node,
        Kind::RawUdp,
        at(s, false, UDP),
        none(),
    );
    let ll = SocketAddr::V6(SocketAddrV6::new(
        link_local(s),
        APP,
        0,
        node.bridge_index(),
    ));
    suite.attempt("link-local IPv6", From::Node, Kind::Tcp, ll, none());

    // Addresses added after enrolment, tried at once (before the agent may have learned
    // them) and again a moment later.
    let late4 = format!("10.213.{}.99", node.subnet());
    let late6 = format!("fd00:213:{:x}::99", node.subnet());
    s.ip_in(&["addr", "add", &format!("{late4}/24"), "dev", "eth0"]);
    s.ip_in(&[
        "-6",
        "addr",
        "add",
        &format!("{late6}/64"),
        "dev",
        "eth0",
        "nodad",
    ]);
    for _ in 0..2 {
        for ip in [&late4, &late6] {
            let ip: IpAddr = ip.parse().unwrap();
            let to = SocketAddr::new(ip, APP);
            suite.attempt("an address added late", From::Node, Kind::Tcp, to, none());
            suite.attempt("an address added late", pod, Kind::Tcp, to, none());
        }
        std::thread::sleep(Duration::from_millis(500));
    }

    // While the agent is down (SIGKILL) and while a new one starts.
    agent.kill();
    let until = Instant::now() + Duration::from_secs(2);
    let mut down = 0;
    while Instant::now() < until && down < 20 {
        let v6 = down % 2 == 1;
        suite.attempt("agent killed", pod, Kind::Tcp, at(s, v6, APP), none());
        suite.attempt(
            "agent killed",
            From::Node,
            Kind::Tcp,
            at(s, v6, APP),
            none(),
        );
        down += 2;
    }
    let mut agent = Agent::start(&cfg);
    for v6 in [false, true] {
        suite.attempt("agent restarted", pod, Kind::Tcp, at(s, v6, APP), none());
        suite.attempt(
            "agent restarted",
            From::Node,
            Kind::Tcp,
            at(s, v6, APP),
            none(),
        );
    }

    // The client pod's traffic was intercepted, not merely refused: the suite would prove
    // nothing if every attempt failed for an unrelated reason.
    assert!(
        suite.intercepted >= 4,
        "only {} attempts reached the application through the agent: the mesh path is broken",
        suite.intercepted
    );
    let blocked = suite.tried - suite.bypassed.len();
    println!(
        "bypass attempts: {} tried, {blocked} blocked ({} of them through the agent's mutual TLS)",
        suite.tried, suite.intercepted
    );
    assert!(
        suite.bypassed.is_empty(),
        "ways around the agent:\n{}",
        suite.bypassed.join("\n")
    );
    assert!(agent.stop().success());
}
