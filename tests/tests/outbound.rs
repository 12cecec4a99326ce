//! Outbound interception on a simulated node, with the real agent binary and real kernel
//! programs. Privileged; `cargo xtask test` runs these one at a time.

mod common;

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use common::*;
use simnode::{attached_programs, client_result, command_in, workspace_bin, Agent, AgentConfig};

#[test]
fn plain_client_is_intercepted_v4_and_v6() {
    let Some(node) = node("plain_client_is_intercepted_v4_and_v6", &["a", "b"]) else {
        return;
    };
    let (a, b) = (node.pod("a"), node.pod("b"));
    let _srv = b.serve(&[8080]);
    let mut agent = Agent::start(&AgentConfig::new(&node).pod(a, "open"));

    for v6 in [false, true] {
        let to = at(b, v6, 8080);
        let s = a.client(to, &["--send", "1000", "--reply", "2000"]);
        let r = only(&s.results);
        assert!(redirected(r), "not redirected: {r:?}");
        let server = r.server.as_ref().expect("server view");
        assert_eq!(
            sock(&server.peer).ip(),
            a.ip(v6),
            "server must see pod a's address"
        );
        assert_eq!(
            sock(&server.local),
            to,
            "server reached at the original destination"
        );
        let rec = record(&agent, &r.local, to);
        assert_eq!(rec["pod"], "a");
        assert_eq!(rec["outcome"], "ok");
        assert_eq!(sock(rec["via"].as_str().unwrap()).ip(), a.ip(v6));
        let header = simnode::proto::request_line(1000, 2000, 0).len() as u64;
        assert_eq!(rec["bytes_sent"].as_u64(), Some(1000 + header));
        let received = rec["bytes_received"].as_u64().unwrap();
        assert!(
            received > 2000 && received < 2200,
            "bytes_received {received}"
        );
    }

    // A dual-stack socket dialing an IPv4-mapped address skips connect4 in the kernel:
    // connect6 must catch it, or IPv6 sockets would be a bypass.
    let to = at(b, false, 8080);
    let s = a.client(to, &["--v6-socket"]);
    let r = only(&s.results);
    assert!(redirected(r), "v4-mapped connect not redirected: {r:?}");
    assert_eq!(sock(&r.server.as_ref().unwrap().peer).ip(), a.ip(false));
    assert_eq!(record(&agent, &r.local, to)["outcome"], "ok");
    assert!(agent.stop().success());
}

#[test]
fn bulk_64mib_each_way_and_half_close() {
    let Some(node) = node("bulk_64mib_each_way_and_half_close", &["a", "b"]) else {
        return;
    };
    let (a, b) = (node.pod("a"), node.pod("b"));
    let _srv = b.serve(&[8080]);
    let mut agent = Agent::start(&AgentConfig::new(&node).pod(a, "open"));
    let mib64 = (64u64 << 20).to_string();
    let to = at(b, false, 8080);
    // The client half-closes after sending; the full 64 MiB reply must still arrive.
    let s = a.client(to, &["--send", &mib64, "--reply", &mib64]);
    let r = only(&s.results);
    assert!(redirected(r));
    assert!(r.sent_ok && r.reply_ok, "checksums differ: {r:?}");
    let rec = record(&agent, &r.local, to);
    assert!(rec["bytes_sent"].as_u64().unwrap() > 64 << 20);
    assert!(rec["bytes_received"].as_u64().unwrap() > 64 << 20);
    assert!(agent.stop().success());
}

#[test]
fn thousand_concurrent_connections() {
    let Some(node) = node("thousand_concurrent_connections", &["a", "b"]) else {
        return;
    };
    let (a, b) = (node.pod("a"), node.pod("b"));
    let _srv = b.serve(&[8080]);
    let mut agent = Agent::start(&AgentConfig::new(&node).pod(a, "open"));
    let to = at(b, false, 8080);
    // All 1,000 are connected (through the agent) before any of them sends.
    let s = a.client(
        to,
        &[
            "--count",
            "1000",
            "--concurrency",
            "1000",
            "--send",
            "100",
            "--reply",
            "100",
        ],
    );
    assert_eq!((s.ok, s.failed), (1000, 0), "errors: {:?}", s.errors);
    agent.wait_for(
        "1000 access records",
        |_| records_to(&agent, to) >= 1000,
        WAIT,
    );
    assert!(agent.access().iter().all(|e| e["outcome"] == "ok"));
    assert!(agent.stop().success());
}

#[test]
fn excluded_port_and_cidr_bypass_the_agent() {
    let Some(node) = node("excluded_port_and_cidr_bypass_the_agent", &["a", "b", "c"]) else {
        return;
    };
    let (a, b, c) = (node.pod("a"), node.pod("b"), node.pod("c"));
    let _sb = b.serve(&[8080, 9100]);
    let _sc = c.serve(&[8080]);
    let c4 = format!("{}/32", c.ip4);
    let c6 = format!("{}/128", c.ip6);
    let cfg = AgentConfig::new(&node).pod_with(a, "open", &[9100], &[&c4, &c6]);
    let mut agent = Agent::start(&cfg);

    let bypass = [
        at(b, false, 9100),
        at(b, true, 9100),
        at(c, false, 8080),
        at(c, true, 8080),
    ];
    for to in bypass {
        let s = a.client(to, &[]);
        let r = only(&s.results);
        assert!(!redirected(r), "{to} should bypass the agent: {r:?}");
        assert_eq!(sock(&r.local).ip(), a.ip(to.is_ipv6()));
    }
    // Control: the same pod's other traffic is still intercepted, and its record is the
    // only one the agent made.
    let to = at(b, false, 8080);
    let r = a.client(to, &[]);
    let r = only(&r.results);
    assert!(redirected(r));
    record(&agent, &r.local, to);
    for to in bypass {
        assert_eq!(records_to(&agent, to), 0, "the agent saw {to}");
    }
    assert_eq!(agent.access().len(), 1);
    assert!(agent.stop().success());
    assert_eq!(counter(&agent, "excluded_port"), 2);
    assert_eq!(counter(&agent, "excluded_cidr"), 2);
}

#[test]
fn unenrolled_pod_is_not_intercepted() {
    let Some(node) = node("unenrolled_pod_is_not_intercepted", &["a", "b", "e"]) else {
        return;
    };
    let (a, b, e) = (node.pod("a"), node.pod("b"), node.pod("e"));
    let _srv = b.serve(&[8080]);
    let mut agent = Agent::start(&AgentConfig::new(&node).pod(a, "open"));
    let to = at(b, false, 8080);
    let r = e.client(to, &[]);
    let r = only(&r.results);
    assert!(!redirected(r), "pod e is not enrolled: {r:?}");
    assert_eq!(sock(&r.server.as_ref().unwrap().peer).ip(), e.ip(false));
    let r = a.client(to, &[]);
    let r = only(&r.results);
    assert!(redirected(r), "neighbour a is enrolled: {r:?}");
    record(&agent, &r.local, to);
    assert_eq!(
        agent.access().len(),
        1,
        "only pod a's connection goes through the agent"
    );
    assert!(agent.stop().success());
}

#[test]
fn same_source_port_in_two_pods_routes_each_to_its_destination() {
    let Some(node) = node("same_source_port_in_two_pods", &["a", "c", "b"]) else {
        return;
    };
    let (a, c, b) = (node.pod("a"), node.pod("c"), node.pod("b"));
    let _srv = b.serve(&[9001, 9002]);
    let mut agent = Agent::start(&AgentConfig::new(&node).pod(a, "open").pod(c, "open"));
    let (to_a, to_c) = (at(b, false, 9001), at(b, false, 9002));
    for round in 0..30u16 {
        // Below the ephemeral range (32768-60999), so no socket the agent opens in the pod
        // can hold the port when the client binds it.
        let port = 31000 + round;
        let bind = format!("0.0.0.0:{port}");
        // Both pods' redirected sockets are 127.0.0.1:<port> -> 127.0.0.1:15001 in their
        // own namespaces: identical 4-tuples that only the pod scope tells apart.
        let ca = a.client_spawn(to_a, &["--bind", &bind, "--send", "50000"]);
        let cc = c.client_spawn(to_c, &["--bind", &bind, "--send", "50000"]);
        let (ra, rc) = (client_result(ca), client_result(cc));
        let (ra, rc) = (only(&ra.results), only(&rc.results));
        assert_eq!(sock(&ra.local).port(), port);
        assert_eq!(sock(&rc.local).port(), port);
        assert_eq!(
            sock(&ra.server.as_ref().unwrap().local),
            to_a,
            "round {round}: pod a misrouted"
        );
        assert_eq!(
            sock(&rc.server.as_ref().unwrap().local),
            to_c,
            "round {round}: pod c misrouted"
        );
    }
    assert!(agent.stop().success());
}

#[test]
fn agent_sockets_are_exempt_and_apps_cannot_forge_the_exemption() {
    let Some(node) = node("agent_sockets_are_exempt", &["a", "b"]) else {
        return;
    };
    let (a, b) = (node.pod("a"), node.pod("b"));
    let _srv = b.serve(&[8080]);
    // Sidecar layout: the agent runs in a container cgroup *below* the pod's cgroup, where
    // the programs are attached, so its upstream connects do pass through connect4. Only
    // the cgroup exemption keeps them from being redirected back into the agent.
    let agent_cg = a.sub_cgroup("agent");
    let app_cg = a.sub_cgroup("app");
    let cmd = command_in(Some(&agent_cg), None, workspace_bin("agent"));
    let mut agent = Agent::start_cmd(cmd, &AgentConfig::new(&node).pod(a, "open"));
    let to = at(b, false, 8080);

    let app = |extra: &[&str]| {
        let mut cmd = command_in(Some(&app_cg), Some(&a.netns_path), workspace_bin("podapp"));
        cmd.arg("client")
            .arg("--to")
            .arg(to.to_string())
            .args(extra);
        let out = cmd.output().expect("run podapp");
        let s: simnode::proto::Summary = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
        only(&s.results).clone()
    };
    let r = app(&[]);
    assert!(redirected(&r));
    assert_eq!(sock(&r.server.as_ref().unwrap().peer).ip(), a.ip(false));
    assert_eq!(record(&agent, &r.local, to)["outcome"], "ok");

    // The app copies what it can see of the agent's upstream socket: same source address
    // (the pod's), a socket mark, even a fixed port. It is still intercepted.
    let bind = SocketAddr::new(IpAddr::V4(a.ip4), 43210).to_string();
    let r = app(&["--bind", &bind, "--mark", "1"]);
    assert_eq!(r.local, bind);
    assert_eq!(
        record(&agent, &r.local, to)["outcome"],
        "ok",
        "forged connection bypassed the agent"
    );

    assert!(agent.stop().success());
    assert!(
        counter(&agent, "agent_socket") >= 2,
        "the agent's upstream connects were exempted"
    );
}

#[test]
fn sigterm_honours_fail_open_and_fail_closed() {
    let Some(node) = node("sigterm_honours_fail_modes", &["a", "c", "b"]) else {
        return;
    };
    let (a, c, b) = (node.pod("a"), node.pod("c"), node.pod("b"));
    let _srv = b.serve(&[8080]);
    let cfg = AgentConfig::new(&node).pod(a, "open").pod(c, "closed");
    let mut agent = Agent::start(&cfg);
    let to = at(b, false, 8080);
    for pod in [a, c] {
        let r = pod.client(to, &[]);
        assert!(
            redirected(only(&r.results)),
            "pod {} not intercepted",
            pod.name
        );
    }
    let pins = node.pin_root();
    assert!(pins.join("c/connect4").exists() && pins.join("c/connect6").exists());
    assert!(!pins.join("a").exists(), "fail-open pods pin nothing");

    // A connection in flight at SIGTERM is drained, not cut.
    let held = a.client_spawn(to, &["--hold-ms", "1000"]);
    std::thread::sleep(Duration::from_millis(300));
    assert!(agent.stop().success());
    let held = client_result(held);
    assert!(
        redirected(only(&held.results)),
        "in-flight connection completed through the agent"
    );

    // Fail-open: nothing left, traffic goes direct.
    assert!(
        attached_programs(&a.cgroup).is_empty(),
        "{:?}",
        attached_programs(&a.cgroup)
    );
    let r = a.client(to, &[]);
    assert!(!redirected(only(&r.results)));

    // Fail-closed: only the blocking connect programs stay, pinned (with sendmsg, which
    // keeps the pod's UDP rule); connects fail.
    let mut kinds: Vec<String> = attached_programs(&c.cgroup)
        .into_iter()
        .map(|(t, _)| t)
        .collect();
    kinds.sort();
    assert_eq!(
        kinds,
        [
            "cgroup_inet4_connect",
            "cgroup_inet6_connect",
            "cgroup_udp4_sendmsg",
            "cgroup_udp6_sendmsg"
        ]
    );
    for v6 in [false, true] {
        let r = c.client(at(b, v6, 8080), &[]);
        assert_eq!(
            r.ok, 0,
            "fail-closed pod c reached the server without the agent: {r:?}"
        );
    }

    // A new agent adopts the pod: traffic flows again, the old programs are replaced.
    let mut agent = Agent::start(&cfg);
    agent.wait_for(
        "adoption",
        |e| e["message"] == "adopted the pod from a previous agent" && e["pod"] == "c",
        WAIT,
    );
    let r = c.client(to, &[]);
    assert!(redirected(only(&r.results)));
    assert_eq!(
        attached_programs(&c.cgroup).len(),
        simnode::agent::served_cgroup_programs(),
        "connect4/6, sendmsg4/6, sock_ops: {:?}",
        attached_programs(&c.cgroup)
    );
    assert!(agent.stop().success());
    assert_eq!(
        c.client(to, &[]).ok,
        0,
        "blocked again after the second stop"
    );

    // Explicit uninstall removes everything; the pod's traffic goes direct.
    assert!(uninstall(&node).contains("removed pins of pod c"));
    for pod in [a, c] {
        assert!(
            attached_programs(&pod.cgroup).is_empty(),
            "pod {} still has programs",
            pod.name
        );
    }
    assert!(!pins.exists(), "pin root left behind");
    assert!(!redirected(only(&c.client(to, &[]).results)));
}

#[test]
fn sigkill_leaves_a_fail_closed_pod_blocked_until_adopted() {
    let Some(node) = node("sigkill_leaves_fail_closed_pod_blocked", &["c", "b"]) else {
        return;
    };
    let (c, b) = (node.pod("c"), node.pod("b"));
    let _srv = b.serve(&[8080]);
    let cfg = AgentConfig::new(&node).pod(c, "closed");
    let mut agent = Agent::start(&cfg);
    let to = at(b, false, 8080);
    assert!(redirected(only(&c.client(to, &[]).results)));

    // No chance to clean up: the pinned programs keep redirecting to a listener that is
    // gone, so connects fail instead of leaving the pod in clear.
    agent.kill();
    for v6 in [false, true] {
        let r = c.client(at(b, v6, 8080), &[]);
        assert_eq!(
            r.ok, 0,
            "pod c reached the server after its agent was killed: {r:?}"
        );
    }

    let mut agent = Agent::start(&cfg);
    agent.wait_for(
        "adoption",
        |e| e["message"] == "adopted the pod from a previous agent",
        WAIT,
    );
    assert!(redirected(only(&c.client(to, &[]).results)));
    assert!(agent.stop().success());
    uninstall(&node);
    assert!(attached_programs(&c.cgroup).is_empty());
    assert!(!redirected(only(&c.client(to, &[]).results)));
}
