//! Overload: each connection and handshake limit is driven past its value on a simulated
//! node. What is over the limit is shed (reset, counted by reason), what is under it is
//! served, and a pod at its own limit never takes what another pod needs.

mod common;

use std::{
    io::{Read, Write},
    net::TcpStream,
    time::Duration,
};

use common::*;
use simnode::{app::client_result, pki::DevCa, Agent, AgentConfig};

const TD: &str = "spiffe://td.test/ns/default/sa";

/// `agent_connections_shed_total` for one pod and reason.
fn shed(agent: &Agent, pod: &str, reason: &str) -> f64 {
    metric(
        agent,
        "agent_connections_shed_total",
        &[("pod", pod), ("reason", reason)],
    )
}

/// Waits until the agent holds `live` connections and has shed `shed_count` of `pod`'s
/// for `reason`: a fixed sleep raced the client's start on a slow machine.
fn wait_for_load(agent: &Agent, pod: &str, reason: &str, live: f64, shed_count: f64) {
    let now = settle(
        Duration::from_secs(10),
        || {
            (
                metric(agent, "agent_connections_active", &[]),
                shed(agent, pod, reason),
            )
        },
        |v| *v == (live, shed_count),
    );
    assert_eq!(
        now,
        (live, shed_count),
        "{pod}: (live, shed for {reason}) is not what was expected"
    );
}

#[test]
fn a_pod_over_its_connection_limit_is_shed_and_other_pods_are_served() {
    let Some(node) = node("conn_limits", &["a", "c", "b"]) else {
        return;
    };
    let (a, c, b) = (node.pod("a"), node.pod("c"), node.pod("b"));
    // b is not enrolled: only the clients' outbound connections count.
    let _srv = b.serve(&[8080]);
    let cfg = AgentConfig::new(&node)
        .set("max_connections_per_pod = 20\nmax_connections = 30")
        .pod(a, "open")
        .pod(c, "open");
    let mut agent = Agent::start(&cfg);
    let to = at(b, false, 8080);
    // a asks for 40 at once and holds them: 20 are its share.
    let greedy = a.client_spawn(
        to,
        &["--count", "40", "--concurrency", "40", "--hold-ms", "3000"],
    );
    wait_for_load(&agent, "a", "pod_connection_limit", 20.0, 20.0);
    // c is served while a is at its limit: 10 fill the node (30), the other 5 are shed.
    let r = c.client(to, &["--count", "15", "--concurrency", "15"]);
    assert_eq!(r.ok, 10, "the other pod was not served: {:?}", r.errors);
    let greedy = client_result(greedy);
    assert_eq!((greedy.ok, greedy.failed), (20, 20), "{:?}", greedy.errors);
    assert_eq!(shed(&agent, "a", "pod_connection_limit"), 20.0);
    assert_eq!(shed(&agent, "c", "node_connection_limit"), 5.0);
    // Once a lets go, both are served in full again.
    assert_eq!(
        a.client(to, &["--count", "20", "--concurrency", "20"]).ok,
        20
    );
    assert_eq!(
        c.client(to, &["--count", "20", "--concurrency", "20"]).ok,
        20
    );
    println!("shed: a 20 (pod limit), c 5 (node limit); served: a 20 + c 10 under load");
    assert!(agent.stop().success());
}

/// A ClientHello offering the agent's ALPN, as a mesh agent's would start.
fn client_hello() -> Vec<u8> {
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(rustls::RootCertStore::empty())
    .with_no_client_auth();
    let mut config = config;
    config.alpn_protocols = vec![agent::tls::ALPN.to_vec()];
    let mut conn =
        rustls::ClientConnection::new(std::sync::Arc::new(config), "s.test".try_into().unwrap())
            .unwrap();
    let mut hello = Vec::new();
    conn.write_tls(&mut hello).unwrap();
    hello
}

/// Opens a connection to `to`, sends a ClientHello and then says nothing more: the
/// agent's handshake waits for the client's reply (holding a handshake slot) until its
/// timeout.
fn stalled_handshake(to: std::net::SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(3))
        .unwrap_or_else(|e| panic!("connect {to}: {e}"));
    s.write_all(&client_hello()).unwrap();
    s
}

#[test]
fn handshakes_in_flight_are_limited_per_pod_and_per_node() {
    let Some(node) = node("handshake_limits", &["s", "t", "c"]) else {
        return;
    };
    let (s, t, c) = (node.pod("s"), node.pod("t"), node.pod("c"));
    let ca = DevCa::new(&node.tmp().join("ca"));
    let allow = node.tmp().join("allow-all.yaml");
    let svid = |name: &str| ca.issue(&format!("{TD}/{name}"), &node.tmp().join(name), false);
    let (ss, ts, cs) = (svid("s"), svid("t"), svid("c"));
    let cfg = AgentConfig::new(&node)
        .mesh()
        .set("max_handshakes_per_pod = 4\nmax_handshakes = 6\nhandshake_timeout_ms = 8000")
        .pod_extra(s, "closed", &ss.toml_strict(&allow))
        .pod_extra(t, "closed", &ts.toml_strict(&allow))
        .pod_extra(c, "closed", &cs.toml());
    let mut agent = Agent::start(&cfg);
    let _srv = t.serve(&[8080]);
    // Six stalled handshakes at s: four hold its slots, two are shed.
    let mut stalled: Vec<TcpStream> = (0..6)
        .map(|_| stalled_handshake(at(s, false, 8080)))
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    // A shed connection is reset; a held one got the agent's ServerHello and waits.
    let reset = |st: &mut TcpStream| {
        st.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut buf = [0u8; 4096];
        matches!(st.read(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset)
    };
    let shed_now = stalled.iter_mut().map(reset).filter(|r| *r).count();
    assert_eq!(
        shed_now, 2,
        "two of six stalled handshakes should have been shed"
    );
    assert_eq!(shed(&agent, "s", "pod_handshake_limit"), 2.0);
    // s is saturated; t still completes mutual TLS with c (the node has 2 slots left).
    let r = c.client(at(t, false, 8080), &[]);
    assert_eq!(
        r.ok, 1,
        "another pod's handshake was starved: {:?}",
        r.errors
    );
    // Two stalled at t fill the node: c's next handshake with t is shed by the node limit.
    stalled.extend((0..2).map(|_| stalled_handshake(at(t, false, 8080))));
    std::thread::sleep(Duration::from_millis(500));
    let r = c.client(at(t, false, 8080), &[]);
    assert_eq!(r.ok, 0, "a handshake past the node's limit was served");
    assert!(
        shed(&agent, "t", "node_handshake_limit") + shed(&agent, "c", "node_handshake_limit")
            >= 1.0
    );
    // The slots come back when the stalled ones go.
    drop(stalled);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(c.client(at(t, false, 8080), &[]).ok, 1);
    assert!(agent.stop().success());
}
