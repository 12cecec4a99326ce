//! UDP to enrolled pods: a STRICT pod drops inbound datagrams in the kernel except on its
//! `udp_allow_ports` (and replies to its own connected sockets); a PERMISSIVE pod's UDP is
//! left alone. Both outcomes are counted.

mod common;

use std::{
    net::{SocketAddr, UdpSocket},
    time::Duration,
};

use common::*;
use simnode::{
    attempt::{Kind, Outcome, Tricks},
    pki::DevCa,
    Agent, AgentConfig, Pod,
};

const TD: &str = "spiffe://td.test/ns/default/sa";

/// A UDP echo server on `port` of both the pod's addresses, for `for_how_long`.
fn udp_echo(pod: &Pod, port: u16, for_how_long: Duration) {
    for v6 in [false, true] {
        let addr = at(pod, v6, port);
        pod.in_netns(move || {
            let s = UdpSocket::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
            s.set_read_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            let until = std::time::Instant::now() + for_how_long;
            let mut buf = [0u8; 1500];
            while std::time::Instant::now() < until {
                if let Ok((n, from)) = s.recv_from(&mut buf) {
                    let _ = s.send_to(&buf[..n], from);
                }
            }
        });
    }
    std::thread::sleep(Duration::from_millis(200));
}

/// Sends one datagram from the node to `to` and says whether the echo came back (three
/// tries, a datagram may be lost).
fn echoed(to: SocketAddr) -> bool {
    let bind: SocketAddr = if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }
        .parse()
        .unwrap();
    let s = UdpSocket::bind(bind).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut buf = [0u8; 64];
    (0..3).any(|_| {
        s.send_to(b"ping", to).is_ok()
            && s.recv_from(&mut buf)
                .is_ok_and(|(n, _)| &buf[..n] == b"ping")
    })
}

/// The `[[pod]]` table of pod `s`: STRICT, with an SVID, allowing UDP `port`.
fn strict_with_udp_port(node: &simnode::Node, port: u16) -> toml::Table {
    let ca = DevCa::new(&node.tmp().join("ca"));
    let ss = ca.issue(&format!("{TD}/s"), &node.tmp().join("s"), false);
    let allow = node.tmp().join("allow-all.yaml");
    let mut strict: toml::Table = ss.toml_strict(&allow).parse().expect("the SVID's TOML");
    strict.insert("udp_allow_ports".into(), vec![i64::from(port)].into());
    strict
}

#[test]
fn strict_pods_drop_inbound_udp_except_allowed_ports_and_permissive_pods_are_untouched() {
    let Some(node) = node("udp_inbound", &["s", "p"]) else {
        return;
    };
    let (s, p) = (node.pod("s"), node.pod("p"));
    let strict = strict_with_udp_port(&node, 5353);
    let cfg = AgentConfig::new(&node)
        .pod_table(s, "closed", strict)
        .pod(p, "open");
    let mut agent = Agent::start(&cfg);
    let run = Duration::from_secs(20);
    for pod in [s, p] {
        udp_echo(pod, 9000, run);
        udp_echo(pod, 5353, run);
    }
    for v6 in [false, true] {
        assert!(
            !echoed(at(s, v6, 9000)),
            "plaintext UDP from the node reached the STRICT pod's port 9000 (v6={v6})"
        );
        assert!(
            echoed(at(s, v6, 5353)),
            "the STRICT pod's allowed UDP port 5353 is unreachable (v6={v6})"
        );
        assert!(
            echoed(at(p, v6, 9000)),
            "the PERMISSIVE pod's UDP was touched (v6={v6})"
        );
    }
    // Replies to the STRICT pod's own connected socket come back on any port.
    let server = UdpSocket::bind(SocketAddr::new(node.ip4().into(), 0)).unwrap();
    let server_addr = server.local_addr().unwrap();
    std::thread::spawn(move || {
        server
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut buf = [0u8; 64];
        while let Ok((n, from)) = server.recv_from(&mut buf) {
            let _ = server.send_to(&buf[..n], from);
        }
    });
    let src = at(s, false, 0);
    let replied = s
        .in_netns(move || {
            let c = UdpSocket::bind(src).unwrap();
            c.connect(server_addr).unwrap();
            c.set_read_timeout(Some(Duration::from_millis(300)))
                .unwrap();
            let mut buf = [0u8; 64];
            (0..3).any(|_| c.send(b"query").is_ok() && c.recv(&mut buf).is_ok())
        })
        .join()
        .unwrap();
    assert!(
        replied,
        "a reply to the STRICT pod's connected UDP socket was dropped"
    );
    let c = &node.kernel_maps()["COUNTERS"];
    assert!(c["udp_inbound_dropped"].as_u64() >= Some(2), "{c}");
    assert!(c["udp_inbound_allowed"].as_u64() >= Some(2), "{c}");
    println!(
        "kernel UDP counters: dropped {}, allowed {}",
        c["udp_inbound_dropped"], c["udp_inbound_allowed"]
    );
    assert!(agent.stop().success());
}

#[test]
fn outbound_udp_to_the_mesh_is_refused_for_deny_pods_except_allowed_ports() {
    let Some(node) = node("udp_outbound", &["s", "p"]) else {
        return;
    };
    let (s, p) = (node.pod("s"), node.pod("p"));
    // STRICT, so udp_outbound is "deny" without saying so.
    let strict = strict_with_udp_port(&node, 5353);
    // A mesh network with no pod in it: refused by the trie, not by the enrolled-pod table.
    let cfg = AgentConfig::new(&node)
        .value("mesh_networks", vec!["10.213.250.0/24", "fd00:213:fa::/48"])
        .pod_table(s, "closed", strict)
        .pod(p, "open");
    let mut agent = Agent::start(&cfg);
    let run = Duration::from_secs(20);
    udp_echo(p, 9000, run);
    udp_echo(p, 5353, run);
    let none = Tricks::default();
    let refused = |o: &Outcome| {
        !o.sent
            && o.error
                .as_deref()
                .is_some_and(|e| e.contains("Operation not permitted"))
    };
    let mut denied = 0;
    for v6 in [false, true] {
        for kind in [Kind::UdpSend, Kind::UdpConnect] {
            let o = s.attempt(kind, at(p, v6, 9000), &none);
            assert!(
                refused(&o),
                "UDP from the deny pod to an enrolled pod went out: {o:?}"
            );
            denied += 1;
        }
        let o = s.attempt(Kind::UdpSend, at(p, v6, 5353), &none);
        assert!(
            o.answered,
            "the allowed UDP port 5353 is unreachable: {o:?}"
        );
    }
    let o = s.attempt(Kind::UdpMapped, at(p, false, 9000), &none);
    assert!(
        refused(&o),
        "UDP to an IPv4-mapped mesh address went out: {o:?}"
    );
    for to in ["10.213.250.9:9000", "[fd00:213:fa::9]:9000"] {
        let o = s.attempt(Kind::UdpSend, sock(to), &none);
        assert!(refused(&o), "UDP to a mesh network went out: {o:?}");
    }
    denied += 3;
    // Outside the mesh (the node itself is neither enrolled nor in mesh_networks), UDP is
    // the application's business; a connected socket's reply is let back in.
    let server = UdpSocket::bind(SocketAddr::new(node.ip4().into(), 0)).unwrap();
    let server_addr = server.local_addr().unwrap();
    std::thread::spawn(move || {
        server.set_read_timeout(Some(run)).unwrap();
        let mut buf = [0u8; 64];
        while let Ok((n, from)) = server.recv_from(&mut buf) {
            let _ = server.send_to(&buf[..n], from);
        }
    });
    let o = s.attempt(Kind::UdpConnect, server_addr, &none);
    assert!(o.answered, "UDP outside the mesh was touched: {o:?}");
    // The PERMISSIVE pod allows outbound UDP, to the mesh too.
    let o = p.attempt(Kind::UdpSend, at(s, false, 9000), &none);
    assert!(o.sent && o.error.is_none(), "{o:?}");
    let c = &node.kernel_maps()["COUNTERS"];
    assert!(c["udp_outbound_denied"].as_u64() >= Some(denied), "{c}");
    assert!(c["udp_outbound_allowed"].as_u64() >= Some(2), "{c}");
    println!(
        "kernel UDP counters: outbound denied {}, allowed {}",
        c["udp_outbound_denied"], c["udp_outbound_allowed"]
    );
    assert!(agent.stop().success());
}
