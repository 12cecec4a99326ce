//! Inbound interception (sk_lookup) on a simulated node: steering to the agent without any
//! port change, the agent's own path to the app, fail-closed after SIGKILL, the probe
//! allowance and exclusions. Privileged; run one at a time by `cargo xtask test`.

mod common;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use common::*;
use simnode::{netns_links, Agent, AgentConfig, Pod};

/// The source the agent uses towards the application (see agent-common).
fn agent_source(v6: bool) -> IpAddr {
    if v6 {
        IpAddr::V6(Ipv6Addr::LOCALHOST)
    } else {
        IpAddr::V4(Ipv4Addr::new(127, 0, 0, 6))
    }
}

/// The application saw this connection come from the agent (not from the client itself).
fn via_agent(r: &simnode::proto::ConnResult, v6: bool) -> bool {
    sock(&r.server.as_ref().expect("server view").peer).ip() == agent_source(v6)
}

/// Connects from `from` to `to` and returns the single result (which must have succeeded).
fn call(from: &Pod, to: SocketAddr) -> simnode::proto::ConnResult {
    only(
        &from
            .client(to, &["--send", "3000", "--reply", "4000"])
            .results,
    )
    .clone()
}

#[test]
fn inbound_connections_are_steered_through_the_agent_v4_and_v6() {
    let Some(node) = node("inbound_steered", &["a", "b"]) else {
        return;
    };
    let (a, b) = (node.pod("a"), node.pod("b"));
    let srv = b.serve(&[8080]);
    let mut agent = Agent::start(&AgentConfig::new(&node).pod(b, "closed"));
    for v6 in [false, true] {
        let to = at(b, v6, 8080);
        let r = call(a, to);
        assert!(
            !redirected(&r),
            "pod a is not enrolled: its own socket is direct"
        );
        let server = r.server.as_ref().unwrap();
        // The application port did not change, and the app was reached by the agent.
        assert_eq!(sock(&server.local), to);
        assert!(
            via_agent(&r, v6),
            "app saw {} instead of the agent",
            server.peer
        );
        let rec = agent.wait_for(
            "inbound record",
            |e| {
                e["target"] == "access"
                    && e["direction"] == "inbound"
                    && e["src"].as_str().is_some_and(|s| same(s, &r.local))
            },
            WAIT,
        );
        assert_eq!(
            rec["dst"],
            to.to_string(),
            "original destination from getsockname()"
        );
        assert_eq!(rec["pod"], "b");
        assert_eq!(rec["outcome"], "ok");
        let sent = rec["bytes_sent"].as_u64().unwrap();
        assert!(
            (3000..3100).contains(&sent),
            "bytes_sent {sent}: request line + 3000"
        );
    }
    assert_eq!(srv.seen().len(), 2);
    assert!(agent.stop().success());
    assert_eq!(counter(&agent, "inbound_steered"), 2);
    assert!(counter(&agent, "inbound_agent_to_app") >= 2);
    uninstall(&node);
}

#[test]
fn both_ends_enrolled_pass_through_both_proxies() {
    let Some(node) = node("both_ends_enrolled", &["a", "b"]) else {
        return;
    };
    let (a, b) = (node.pod("a"), node.pod("b"));
    let _srv = b.serve(&[8080]);
    let mut agent = Agent::start(&AgentConfig::new(&node).pod(a, "open").pod(b, "open"));
    for v6 in [false, true] {
        let to = at(b, v6, 8080);
        let r = call(a, to);
        assert!(redirected(&r) && via_agent(&r, v6), "{r:?}");
        let out = record(&agent, &r.local, to);
        assert_eq!(out["direction"], "outbound");
        let upstream_src = out["via"].as_str().unwrap().to_string();
        let inb = agent.wait_for(
            "inbound leg",
            |e| e["direction"] == "inbound" && e["src"] == upstream_src,
            WAIT,
        );
        assert_eq!(inb["pod"], "b");
        assert_eq!(inb["dst"], to.to_string());
    }
    assert!(agent.stop().success());
}

#[test]
fn fail_closed_inbound_survives_sigkill_and_restart_adopts() {
    let Some(node) = node("fail_closed_inbound", &["a", "b"]) else {
        return;
    };
    let (a, b) = (node.pod("a"), node.pod("b"));
    let srv = b.serve(&[8080]);
    let cfg = AgentConfig::new(&node).pod(b, "closed");
    let mut agent = Agent::start(&cfg);
    assert!(via_agent(&call(a, at(b, false, 8080)), false));
    assert_eq!(netns_links(&b.netns_path), 1);

    agent.kill();
    let served = srv.seen().len();
    for v6 in [false, true] {
        let r = a.client(at(b, v6, 8080), &[]);
        assert_eq!(
            r.ok, 0,
            "plaintext reached pod b with its agent dead: {r:?}"
        );
    }
    assert_eq!(
        srv.seen().len(),
        served,
        "the application saw a connection while unprotected"
    );
    assert_eq!(
        netns_links(&b.netns_path),
        1,
        "the pinned sk_lookup link stays"
    );

    // A new agent takes over without re-creating the pod.
    let mut agent = Agent::start(&cfg);
    for v6 in [false, true] {
        assert!(via_agent(&call(a, at(b, v6, 8080)), v6));
    }
    assert_eq!(
        netns_links(&b.netns_path),
        1,
        "the old link was replaced, not added to"
    );
    assert!(agent.stop().success());
    assert_eq!(
        a.client(at(b, false, 8080), &[]).ok,
        0,
        "closed again after SIGTERM"
    );
    uninstall(&node);
    assert_eq!(netns_links(&b.netns_path), 0);
    let r = call(a, at(b, false, 8080));
    assert_eq!(
        sock(&r.server.unwrap().peer).ip(),
        a.ip(false),
        "direct after uninstall"
    );
}

#[test]
fn fail_open_pod_is_left_with_nothing_attached() {
    let Some(node) = node("fail_open_inbound", &["a", "b"]) else {
        return;
    };
    let (a, b) = (node.pod("a"), node.pod("b"));
    let _srv = b.serve(&[8080]);
    let mut agent = Agent::start(&AgentConfig::new(&node).pod(b, "open"));
    assert!(via_agent(&call(a, at(b, false, 8080)), false));
    assert!(agent.stop().success());
    assert_eq!(netns_links(&b.netns_path), 0);
    assert!(!node.pin_root().join("b").exists());
    let r = call(a, at(b, false, 8080));
    assert_eq!(sock(&r.server.unwrap().peer).ip(), a.ip(false));
}

#[test]
fn probes_from_the_node_are_admitted_narrowly_and_counted() {
    let Some(node) = node("probe_allowance", &["a", "b"]) else {
        return;
    };
    let (a, b) = (node.pod("a"), node.pod("b"));
    let _srv = b.serve(&[8080, 8081]);
    let cfg = AgentConfig::new(&node)
        .set(&format!(
            "probe_sources = [\"{}\", \"{}\"]",
            node.ip4(),
            node.ip6()
        ))
        .pod_extra(b, "closed", "probe_ports = [8081]");
    let mut agent = Agent::start(&cfg);
    for v6 in [false, true] {
        // The probe: from the node's address to the probe port, straight to the app.
        let r = only(&node.host_client(at(b, v6, 8081), &[]).results).clone();
        let node_ip = if v6 {
            IpAddr::V6(node.ip6())
        } else {
            IpAddr::V4(node.ip4())
        };
        assert_eq!(sock(&r.server.as_ref().unwrap().peer).ip(), node_ip);
        // The node to another port, and a pod to the probe port: through the agent.
        let r = only(&node.host_client(at(b, v6, 8080), &[]).results).clone();
        assert!(
            via_agent(&r, v6),
            "node to a non-probe port must be proxied"
        );
        assert!(
            via_agent(&call(a, at(b, v6, 8081)), v6),
            "only node addresses are probes"
        );
    }
    assert!(agent.stop().success());
    assert_eq!(counter(&agent, "inbound_probe"), 2);
    uninstall(&node);
}

#[test]
fn excluded_inbound_port_reaches_the_app_directly() {
    let Some(node) = node("excluded_inbound_port", &["a", "b"]) else {
        return;
    };
    let (a, b) = (node.pod("a"), node.pod("b"));
    let _srv = b.serve(&[8080, 9100]);
    let cfg = AgentConfig::new(&node).pod_extra(b, "open", "exclude_inbound_ports = [9100]");
    let mut agent = Agent::start(&cfg);
    for v6 in [false, true] {
        let r = call(a, at(b, v6, 9100));
        assert_eq!(sock(&r.server.as_ref().unwrap().peer).ip(), a.ip(v6));
        assert!(via_agent(&call(a, at(b, v6, 8080)), v6));
    }
    assert!(agent.stop().success());
    assert_eq!(counter(&agent, "inbound_excluded"), 2);
}
