//! The two alternatives to the plain eBPF redirect, on a simulated node: the sock_ops +
//! sk_msg splice of the app-to-agent hop (`accelerate = true`), and an iptables REDIRECT
//! in the pod (`redirect = "iptables"`, what sidecar meshes do). Privileged.

mod common;

use common::*;
use simnode::{attached_programs, command_in, Agent, AgentConfig};

/// Both hops (app → outbound listener, agent → app on inbound) spliced, v4 and v6; small
/// messages, a 16 MiB transfer each way with a half-close, and bytes checked end to end.
/// (`cargo xtask test` also runs the whole suite a second time with it on in every pod.)
/// On a kernel without what the splice calls (before 5.15) the same traffic must flow
/// without it: the agent says so in its log, `agent status` and `agent pods`, and nothing
/// is spliced.
#[test]
fn splice_carries_both_hops_intact() {
    let Some(node) = node("splice_carries_both_hops_intact", &["a", "b"]) else {
        return;
    };
    let (a, b) = (node.pod("a"), node.pod("b"));
    let _srv = b.serve(&[8080]);
    let mut agent = Agent::start(
        &AgentConfig::new(&node)
            .pod_extra(a, "open", "accelerate = true")
            .pod_extra(b, "open", "accelerate = true"),
    );
    let mib16 = (16u64 << 20).to_string();
    for v6 in [false, true] {
        let to = at(b, v6, 8080);
        for args in [
            &["--send", "100", "--reply", "5000"][..],
            &["--send", &mib16, "--reply", &mib16],
        ] {
            let s = a.client(to, args);
            let r = only(&s.results);
            assert!(redirected(r), "not redirected: {r:?}");
            assert!(
                r.ok(),
                "bytes differ through the splice ({args:?}, v6 {v6}): {r:?}"
            );
            let rec = record(&agent, &r.local, to);
            assert_eq!(rec["outcome"], "ok", "{rec}");
        }
    }
    if let Some(why) = agent.splice_unavailable() {
        eprintln!("this kernel has no splice ({why}): checking the pods are served without it");
        assert!(why.contains("needs Linux 5.15"), "{why}");
        for pod in agent.pods() {
            assert!(
                pod["note"]
                    .as_str()
                    .is_some_and(|n| n.contains("served without the splice")),
                "{pod}"
            );
        }
        assert!(
            agent
                .events()
                .iter()
                .any(|e| e["message"].as_str().is_some_and(
                    |m| m.starts_with("acceleration asked for, but the splice is unavailable")
                )),
            "no warning that the splice is off:\n{}",
            agent.tail(30)
        );
        assert_eq!(
            attached_programs(&a.cgroup).len(),
            5,
            "no splice_track on a kernel without the splice: {:?}",
            attached_programs(&a.cgroup)
        );
        assert!(agent.stop().success());
        assert_eq!(counter(&agent, "splice_added"), 0);
        return;
    }
    assert_eq!(
        attached_programs(&a.cgroup).len(),
        6,
        "connect4/6, sendmsg4/6, record_orig_dst and splice_track: {:?}",
        attached_programs(&a.cgroup)
    );
    assert!(agent.stop().success());
    // Each connection puts four sockets in the sockhash (two per hop).
    let added = counter(&agent, "splice_added");
    assert!(
        added >= 16,
        "splice_added {added}: sock_ops did not add both ends of both hops"
    );
    let spliced = counter(&agent, "spliced_messages");
    eprintln!(
        "splice_added {added}, spliced_messages {spliced}, fallback {}",
        counter(&agent, "splice_fallback")
    );
    assert!(spliced > 0, "no message went through the splice");
}

/// The burst of `burst.rs` through the splice. Fails today: a few replies in every burst
/// are lost. The kernel drops what was spliced into a socket's queue and not yet read when
/// that socket leaves the sockhash, which happens as soon as a half-closed socket (here the
/// agent's, after the client's half-close) receives the peer's FIN. The splice is off by
/// default for now (docs/performance.md).
#[test]
#[ignore = "known: the splice loses replies after a half-close under load (docs/performance.md)"]
fn splice_carries_a_burst_with_half_closes_intact() {
    let Some(node) = node("splice_burst", &["a", "b"]) else {
        return;
    };
    mtls_burst(&node, "accelerate = true").assert_all_ok();
}

/// By default (and with `accelerate = false`) the same traffic never touches the splice.
#[test]
fn splice_is_off_by_default() {
    let Some(node) = node("splice_is_off_by_default", &["a", "b"]) else {
        return;
    };
    if std::env::var_os(simnode::agent::ACCELERATE_ALL).is_some() {
        // The whole-suite pass with the splice on everywhere has nothing to show here.
        return;
    }
    let (a, b) = (node.pod("a"), node.pod("b"));
    let _srv = b.serve(&[8080]);
    let mut agent = Agent::start(&AgentConfig::new(&node).pod(a, "open").pod_extra(
        b,
        "open",
        "accelerate = false",
    ));
    let r = a.client(at(b, false, 8080), &["--send", "1000"]);
    assert!(only(&r.results).ok());
    assert!(agent.stop().success());
    assert_eq!(counter(&agent, "splice_added"), 0);
    assert_eq!(counter(&agent, "spliced_messages"), 0);
}

/// With `redirect = "iptables"` the agent attaches no connect programs to the pod; a
/// REDIRECT rule brings the connection, SO_ORIGINAL_DST names its destination, and the
/// agent's own upstream connects carry the mark the rule skips (else they would loop).
#[test]
fn iptables_redirect_mode() {
    let Some(node) = node("iptables_redirect_mode", &["a", "b"]) else {
        return;
    };
    let (a, b) = (node.pod("a"), node.pod("b"));
    let _srv = b.serve(&[8080]);
    let mut agent = Agent::start(
        &AgentConfig::new(&node)
            .set("upstream_mark = 4242")
            .pod_extra(a, "open", "redirect = \"iptables\""),
    );
    let programs = attached_programs(&a.cgroup);
    assert!(
        !programs.iter().any(|(t, _)| t.contains("connect4")),
        "no connect4 on an iptables pod: {programs:?}"
    );
    for (tool, net) in [("iptables", "10.0.0.0/8"), ("ip6tables", "fd00::/8")] {
        let out = command_in(None, Some(&a.netns_path), tool)
            .args(["-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", net])
            .args([
                "-m",
                "mark",
                "!",
                "--mark",
                "4242",
                "-j",
                "REDIRECT",
                "--to-ports",
                "15001",
            ])
            .output()
            .expect("run iptables (apt install iptables)");
        assert!(
            out.status.success(),
            "{tool}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for v6 in [false, true] {
        let to = at(b, v6, 8080);
        let s = a.client(to, &["--send", "1000", "--reply", "2000"]);
        let r = only(&s.results);
        assert!(r.ok(), "{r:?}");
        let server = r.server.as_ref().expect("server view");
        assert_eq!(
            sock(&server.peer).ip(),
            a.ip(v6),
            "upstream leaves from pod a"
        );
        assert_eq!(sock(&server.local), to);
        // The client's socket keeps its own address (NAT is invisible to it), so find the
        // agent's record by destination.
        let rec = agent.wait_for(
            "the iptables-redirected connection's record",
            |e| e["direction"] == "outbound" && e["dst"] == to.to_string() && e["outcome"] == "ok",
            WAIT,
        );
        assert_eq!(rec["pod"], "a");
    }
    assert!(agent.stop().success());
    assert_eq!(
        counter(&agent, "redirected"),
        0,
        "no eBPF redirect on an iptables pod"
    );
}
