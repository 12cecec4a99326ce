//! A pod's addresses are live: inbound steering covers every address the pod has now or
//! gets later (v4 and v6, any scope), and `agent pods` shows the live set. Found by hand: an
//! address added after enrolment let a plaintext client on the node reach a STRICT pod's
//! application directly.

mod common;

use std::net::{IpAddr, SocketAddr};

use common::*;
use simnode::{pki::DevCa, Agent, AgentConfig, Node, Pod};

/// An extra address in the pod's subnet (host part .99 / ::99).
fn late_address(pod: &Pod, v6: bool) -> IpAddr {
    match pod.ip(v6) {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            IpAddr::from([o[0], o[1], o[2], 99])
        }
        IpAddr::V6(v6) => {
            let mut s = v6.segments();
            s[7] = 0x99;
            IpAddr::from(s)
        }
    }
}

fn pods_addresses(node: &Node, pod: &str) -> Vec<String> {
    let out = std::process::Command::new(simnode::workspace_bin("agent"))
        .args(["pods", "-o", "json", "--socket"])
        .arg(node.admin_socket())
        .output()
        .expect("agent pods");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("pods JSON");
    v.as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == pod)
        .unwrap_or_else(|| panic!("pod {pod} not listed: {v}"))["addresses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn an_address_added_after_enrolment_is_steered_like_the_others() {
    let Some(node) = node("late_address", &["b"]) else {
        return;
    };
    let b = node.pod("b");
    let ca = DevCa::new(&node.tmp().join("ca"));
    let sb = ca.issue(
        "spiffe://td.test/ns/default/sa/b",
        &node.tmp().join("b"),
        false,
    );
    let _srv = b.serve_any(&[8080]);
    let cfg = AgentConfig::new(&node).mesh().pod_extra(
        b,
        "closed",
        &format!("mode = \"strict\"\n{}", sb.toml()),
    );
    let mut agent = Agent::start(&cfg);
    for v6 in [false, true] {
        let addr = late_address(b, v6);
        let plen = if v6 { 64 } else { 24 };
        let cidr = format!("{addr}/{plen}");
        let mut args = vec!["addr", "add", cidr.as_str(), "dev", "eth0"];
        if v6 {
            args.push("nodad");
        }
        b.ip_in(&args);
        let to = SocketAddr::new(addr, 8080);
        // A plaintext client outside the mesh (the node itself) must be refused, as it is
        // on the addresses the pod had at enrolment.
        let r = node.host_client(to, &["--send", "100", "--reply", "100"]);
        assert_eq!(r.ok, 0, "plaintext reached the application on {to}: {r:?}");
        let refused = agent.wait_for(
            &format!("STRICT refusal on {to}"),
            |e| e["target"] == "access" && e["dst"] == to.to_string(),
            WAIT,
        );
        assert_eq!(refused["outcome"], "refused", "{refused}");
        assert!(
            pods_addresses(&node, "b").contains(&addr.to_string()),
            "`agent pods` does not list {addr}"
        );
        // And once it is removed, it is no longer the pod's.
        b.ip_in(&["addr", "del", cidr.as_str(), "dev", "eth0"]);
        let deadline = std::time::Instant::now() + WAIT;
        while pods_addresses(&node, "b").contains(&addr.to_string()) {
            assert!(
                std::time::Instant::now() < deadline,
                "`agent pods` still lists {addr}"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
    assert!(agent.stop().success());
    uninstall(&node);
}

#[test]
fn with_no_agent_an_address_added_to_a_fail_closed_pod_is_dropped_by_the_kernel() {
    let Some(node) = node("late_address_no_agent", &["b"]) else {
        return;
    };
    let b = node.pod("b");
    let _srv = b.serve_any(&[8080]);
    let mut agent = Agent::start(&AgentConfig::new(&node).pod(b, "closed"));
    agent.kill();
    // Nobody can learn this address now: only the pinned sk_lookup program stands between
    // the node and the application.
    let addr = late_address(b, false);
    b.ip_in(&["addr", "add", &format!("{addr}/24"), "dev", "eth0"]);
    let r = node.host_client(
        SocketAddr::new(addr, 8080),
        &["--send", "10", "--reply", "10"],
    );
    assert_eq!(
        r.ok, 0,
        "an unknown address of a fail-closed pod passed: {r:?}"
    );
    let v = node.kernel_maps();
    assert!(
        v["COUNTERS"]["inbound_unknown_address"].as_u64() >= Some(1),
        "the kernel did not count the drop: {}",
        v["COUNTERS"]
    );
    uninstall(&node);
}
