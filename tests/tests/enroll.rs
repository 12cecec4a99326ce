//! Pods enrolled and released at runtime (`agent enroll` / `agent release`, the admin API),
//! on an agent started with no pods at all, as a node agent is: traffic, logs and
//! `explain` as for configured pods; releases that touch no other pod; idempotent and
//! validated enrolment; pods deleted without a release.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use simnode::{
    attached_programs, netns_links, netns_links_by_ino,
    pki::{DevCa, Svid},
    Agent, AgentConfig, Enrol, Node,
};

const TD: &str = "spiffe://td.test/ns/default/sa";

fn svid(ca: &DevCa, node: &Node, name: &str) -> Svid {
    ca.issue(&format!("{TD}/{name}"), &node.tmp().join(name), false)
}

/// An agent with no pods, whose pods' addresses form the mesh.
fn empty_agent(node: &Node) -> Agent {
    Agent::start(&AgentConfig::new(node).mesh())
}

fn pod_view(agent: &Agent, name: &str) -> Option<Value> {
    agent.pods().into_iter().find(|p| p["name"] == name)
}

#[test]
fn pods_enrolled_at_runtime_speak_mtls_and_are_explained_like_configured_ones() {
    let Some(node) = node("runtime_enrol_mtls", &["a", "b"]) else {
        return;
    };
    let (a, b) = (node.pod("a"), node.pod("b"));
    let ca = DevCa::new(&node.tmp().join("ca"));
    let (sa, sb) = (svid(&ca, &node, "a"), svid(&ca, &node, "b"));
    let _srv = b.serve(&[8080]);
    let mut agent = empty_agent(&node);
    assert!(agent.pods().is_empty(), "the agent started with pods");
    let out = agent.enroll_ok(&Enrol::pod(a).strict(&sa));
    assert!(out.stdout.contains("pod a enrolled"), "{out:?}");
    agent.enroll_ok(&Enrol::pod(b).strict(&sb));
    for v6 in [false, true] {
        let to = at(b, v6, 8080);
        let r = a.client(to, &["--send", "2000", "--reply", "3000"]);
        let r = only(&r.results);
        assert!(redirected(r), "pod a's connect was not redirected: {r:?}");
        let out = record(&agent, &r.local, to);
        assert_eq!(out["tls"], "mtls");
        assert_eq!(out["peer_identity"], format!("{TD}/b"));
        let inb = agent.wait_for(
            "inbound leg",
            |e| e["target"] == "access" && e["direction"] == "inbound" && e["src"] == out["via"],
            WAIT,
        );
        assert_eq!(inb["pod"], "b");
        assert_eq!(inb["peer_identity"], format!("{TD}/a"));
        assert_eq!(inb["outcome"], "ok");
        // `explain` tells both legs of the runtime-enrolled pods' connection.
        let conn = out["conn"].to_string();
        let explained = agent.cli(&["explain", &conn]);
        assert_eq!(explained.code, Some(0), "{explained:?}");
        for needle in [
            "intercepted by cgroup/connect4|6 + sock_ops",
            &format!("peer {TD}/b"),
            "other leg:",
            &format!("peer {TD}/a"),
        ] {
            assert!(
                explained.stdout.contains(needle),
                "explain lacks {needle:?}:\n{}",
                explained.stdout
            );
        }
    }
    // `agent conns` lists a runtime pod's live connection like any other.
    let held = a.client_spawn(at(b, false, 8080), &["--hold-ms", "1500"]);
    let deadline = Instant::now() + WAIT;
    let live = loop {
        let conns = agent.cli(&["conns", "--pod", "a", "-o", "json"]).json();
        if let Some(c) = conns.as_array().and_then(|c| c.first()).cloned() {
            break c;
        }
        assert!(
            Instant::now() < deadline,
            "no live connection of pod a listed"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(live["direction"], "outbound", "{live}");
    assert_eq!(live["dst"], at(b, false, 8080).to_string(), "{live}");
    assert!(only(&simnode::client_result(held).results).ok());
    let metrics = agent.cli(&["metrics"]);
    assert!(
        metrics
            .stdout
            .contains(r#"agent_reloads_total{pod="b",kind="identity",result="ok"}"#),
        "the runtime pod is missing from the metrics:\n{}",
        metrics.stdout
    );
    let view = pod_view(&agent, "b").expect("b listed");
    assert_eq!(view["source"], "api");
    assert_eq!(view["state"], "enrolled");
    assert_eq!(view["identity"], format!("{TD}/b"));
    assert!(agent.stop().success());
    uninstall(&node);
}

#[test]
fn releasing_one_pod_leaves_the_others_alone_and_honours_its_fail_mode() {
    let Some(node) = node("runtime_release", &["a", "b", "open", "closed", "late"]) else {
        return;
    };
    let (a, b) = (node.pod("a"), node.pod("b"));
    let (open, closed, late) = (node.pod("open"), node.pod("closed"), node.pod("late"));
    let _srv = b.serve(&[8080]);
    let mut agent = empty_agent(&node);
    agent.enroll_ok(&Enrol::pod(a).fail_mode("open"));
    agent.enroll_ok(&Enrol::pod(b).fail_mode("open"));
    agent.enroll_ok(&Enrol::pod(open).fail_mode("open"));
    agent.enroll_ok(&Enrol::pod(closed).fail_mode("closed"));
    let to = at(b, false, 8080);
    for p in [open, closed] {
        assert!(
            redirected(only(&p.client(to, &[]).results)),
            "{} not redirected",
            p.name
        );
    }
    // A client loop of pod a against pod b runs while the other two are released.
    let mut load = a.client_spawn(
        to,
        &[
            "--count",
            "300",
            "--hold-ms",
            "10",
            "--send",
            "100",
            "--reply",
            "100",
        ],
    );
    std::thread::sleep(Duration::from_millis(300));
    // Enrolling a pod in the middle of the loop does not touch it either.
    agent.enroll_ok(&Enrol::pod(late).fail_mode("open"));
    assert!(redirected(only(&late.client(to, &[]).results)));
    // A release drains the pod's open connection before it honours the fail mode.
    let draining = open.client_spawn(to, &["--hold-ms", "800"]);
    std::thread::sleep(Duration::from_millis(200));
    for name in ["open", "closed"] {
        let out = agent.cli(&["release", name]);
        assert_eq!(out.code, Some(0), "release {name}: {out:?}");
        assert!(
            out.stdout.contains(&format!("pod {name} released")),
            "{out:?}"
        );
        if name == "open" {
            assert!(
                out.stdout.contains("1 connections drained, 0 cut"),
                "{out:?}"
            );
        }
    }
    let drained = simnode::client_result(draining);
    assert!(
        only(&drained.results).ok(),
        "the connection open during the release failed"
    );
    assert!(
        load.try_wait().expect("poll the loop").is_none(),
        "the loop ended before the releases: it proves nothing"
    );
    let r = simnode::client_result(load);
    assert_eq!(
        (r.ok, r.failed),
        (300, 0),
        "pod a's loop saw failures: {:?}",
        r.errors
    );
    // Released fail-open: direct, unmediated.
    let direct = open.client(to, &[]);
    let direct = only(&direct.results);
    assert!(
        !redirected(direct),
        "the released fail-open pod is still redirected"
    );
    // Released fail-closed: refused until enrolled again.
    let refused = closed.client(to, &[]);
    assert_eq!(
        refused.ok, 0,
        "the released fail-closed pod got out: {refused:?}"
    );
    let view = pod_view(&agent, "closed").expect("the blocked pod is listed");
    assert_eq!(view["state"], "blocked", "{view}");
    assert!(
        pod_view(&agent, "open").is_none(),
        "the fail-open pod is still listed"
    );
    let again = agent.enroll_ok(&Enrol::pod(closed).fail_mode("closed"));
    assert!(again.stdout.contains("adopting"), "{again:?}");
    assert!(redirected(only(&closed.client(to, &[]).results)));
    assert!(agent.stop().success());
    uninstall(&node);
}

#[test]
fn enrolling_twice_is_idempotent_a_different_spec_or_a_bad_field_is_refused() {
    let Some(node) = node("runtime_enrol_twice", &["a", "b"]) else {
        return;
    };
    let (a, b) = (node.pod("a"), node.pod("b"));
    let mut agent = empty_agent(&node);
    let spec = Enrol::pod(a)
        .fail_mode("closed")
        .arg("--exclude-port", "22");
    agent.enroll_ok(&spec);
    let again = agent.enroll_ok(&spec);
    assert!(
        again.stdout.contains("already enrolled with this spec"),
        "{again:?}"
    );
    assert_eq!(
        attached_programs(&a.cgroup).len(),
        simnode::agent::served_cgroup_programs(),
        "duplicate cgroup attachments (connect4/6, sendmsg4/6, sock_ops)"
    );
    assert_eq!(netns_links(&a.netns_path), 1, "duplicate sk_lookup links");
    let different = agent.enroll(&Enrol::pod(a).fail_mode("open").arg("--exclude-port", "22"));
    assert_eq!(different.code, Some(2), "{different:?}");
    assert!(
        different.stderr.contains("fail_mode: closed → open"),
        "the error does not name the difference: {}",
        different.stderr
    );
    let bad = agent.enroll(&Enrol::pod(b).arg("--exclude-port", "0"));
    assert_eq!(bad.code, Some(2), "{bad:?}");
    assert!(
        bad.stderr
            .contains("exclude_ports[0]: port 0 is not a port"),
        "{}",
        bad.stderr
    );
    let missing = agent.enroll(&Enrol::pod(b).arg("--policy", "/nonexistent/policy.yaml"));
    assert_eq!(missing.code, Some(2), "{missing:?}");
    assert!(missing.stderr.contains("policy:"), "{}", missing.stderr);
    // Nothing of b was attached by the refused requests.
    assert!(attached_programs(&b.cgroup).is_empty());
    assert_eq!(netns_links(&b.netns_path), 0);
    assert!(pod_view(&agent, "b").is_none());
    let unknown = agent.cli(&["release", "nobody"]);
    assert_eq!(unknown.code, Some(1), "{unknown:?}");
    assert!(agent.stop().success());
    uninstall(&node);
}

#[test]
fn a_pod_whose_netns_is_deleted_is_released_by_the_agent_and_nothing_is_left() {
    let Some(node) = node("runtime_netns_gone", &["a", "b"]) else {
        return;
    };
    let (a, b) = (node.pod("a"), node.pod("b"));
    let _srv = b.serve(&[8080]);
    let mut agent = empty_agent(&node);
    agent.enroll_ok(&Enrol::pod(a).fail_mode("closed"));
    agent.enroll_ok(&Enrol::pod(b).fail_mode("open"));
    let ino = a.netns_ino();
    assert!(
        node.pin_root().join("a").exists(),
        "a fail-closed pod is pinned"
    );
    assert_eq!(netns_links_by_ino(ino), 1);
    let started = Instant::now();
    a.delete_netns();
    agent.wait_for(
        "the agent releasing pod a",
        |e| e["message"] == "the pod's network namespace is gone: releasing it" && e["pod"] == "a",
        Duration::from_secs(5),
    );
    println!(
        "pod a released {:?} after its netns was deleted",
        started.elapsed()
    );
    // Nothing of a: no cgroup programs, no netns link, no pins, no record, no map entry.
    assert!(
        attached_programs(&a.cgroup).is_empty(),
        "{:?}",
        attached_programs(&a.cgroup)
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while netns_links_by_ino(ino) != 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        netns_links_by_ino(ino),
        0,
        "sk_lookup still attached to the deleted netns"
    );
    assert!(!node.pin_root().join("a").exists(), "pins of a are left");
    assert!(
        !node.state_dir().join("pods/a.json").exists(),
        "a's record is left"
    );
    assert!(pod_view(&agent, "a").is_none());
    let v = node.kernel_maps();
    assert_eq!(
        v["POD_CONFIG"].as_array().map(Vec::len),
        Some(1),
        "only pod b is left in the kernel: {}",
        v["POD_CONFIG"]
    );
    // The other pod is untouched.
    let b_view = pod_view(&agent, "b").expect("b is still served");
    assert_eq!(b_view["state"], "enrolled");
    assert!(agent.stop().success());
    uninstall(&node);
}
