//! Node mode through the CNI chained plugin, invoked exactly as a container runtime does
//! (environment and stdin of the CNI spec), against pods whose cgroups sit where the
//! kubelet puts them: ADD enrols (fail closed when the agent cannot), DEL releases however
//! often it comes, CHECK tells the truth, excluded namespaces are left alone, and a STRICT
//! pod without identity material is enrolled blocked, never served in plaintext.

mod common;

use std::path::PathBuf;

use common::*;
use serde_json::Value;
use simnode::{
    attached_programs,
    cni::{call, net_conf},
    pki::{DevCa, Svid},
    require_root, Agent, AgentConfig, Node, Pod,
};

const TD: &str = "spiffe://td.test/ns";

/// Where a CSI driver would mount `pod`'s SVID on this node.
fn svid_dir(node: &Node, pod: &Pod) -> PathBuf {
    node.tmp().join(format!("kubelet/pods/{}/spiffe", pod.uid))
}

fn issue(ca: &DevCa, node: &Node, pod: &Pod, namespace: &str) -> Svid {
    ca.issue(
        &format!("{TD}/{namespace}/sa/{}", pod.name),
        &svid_dir(node, pod),
        false,
    )
}

/// An agent in node mode: namespace `shop` is STRICT, `kube-system` is left alone.
fn node_agent(node: &Node) -> Agent {
    let template = node.tmp().join("kubelet/pods/{uid}/spiffe");
    let mut table = toml::Table::new();
    table.insert(
        "cgroup_root".into(),
        node.kubelet_cgroup_root().display().to_string().into(),
    );
    table.insert("identity_dir".into(), template.display().to_string().into());
    table.insert("strict_namespaces".into(), vec!["shop"].into());
    table.insert("exclude_namespaces".into(), vec!["kube-system"].into());
    Agent::start(
        &AgentConfig::new(node)
            .mesh()
            .value("node", toml::Value::Table(table)),
    )
}

fn listed(agent: &Agent, name: &str) -> Option<Value> {
    agent.pods().into_iter().find(|p| p["name"] == name)
}

#[test]
fn pods_added_by_a_runtime_speak_mtls_and_are_removed_by_del() {
    let Some(node) = require_root("cni_add_del")
        .then(|| Node::kubelet(&[("web", "burstable"), ("api", "besteffort")]))
    else {
        return;
    };
    let (web, api) = (node.pod("web"), node.pod("api"));
    let ca = DevCa::new(&node.tmp().join("ca"));
    for p in [web, api] {
        issue(&ca, &node, p, "shop");
    }
    let _srv = api.serve(&[8080]);
    let mut agent = node_agent(&node);
    for p in [web, api] {
        let conf = net_conf(p, &node.admin_socket(), false);
        let out = call("ADD", p, "shop", &conf);
        assert_eq!(out.code, Some(0), "ADD {}: {out:?}", p.name);
        let result: Value = serde_json::from_str(&out.stdout).expect("ADD prints a result");
        assert_eq!(
            result["ips"], conf["prevResult"]["ips"],
            "prevResult unchanged"
        );
        assert_eq!(
            call("CHECK", p, "shop", &conf).code,
            Some(0),
            "CHECK {}",
            p.name
        );
    }
    let status = call(
        "STATUS",
        web,
        "shop",
        &net_conf(web, &node.admin_socket(), false),
    );
    assert_eq!(
        status.code,
        Some(0),
        "STATUS with the agent ready: {status:?}"
    );
    let view = listed(&agent, "shop.api").expect("shop.api listed");
    assert_eq!(view["source"], "cni");
    assert_eq!(view["kubernetes"]["uid"], api.uid.as_str());
    assert_eq!(view["kubernetes"]["namespace"], "shop");
    assert_eq!(view["identity"], format!("{TD}/shop/sa/api"));
    assert_eq!(view["cgroup"], api.cgroup.display().to_string());
    assert_eq!(view["mode"], "strict");
    let to = at(api, false, 8080);
    let r = web.client(to, &["--send", "1000", "--reply", "1000"]);
    let r = only(&r.results);
    let out = record(&agent, &r.local, to);
    assert_eq!(out["pod"], "shop.web");
    assert_eq!(out["tls"], "mtls");
    assert_eq!(out["peer_identity"], format!("{TD}/shop/sa/api"));
    // Runtimes call DEL twice (stop, then remove the sandbox), the second after the netns
    // is gone; both succeed, and nothing of the pod stays.
    let conf = net_conf(api, &node.admin_socket(), false);
    assert_eq!(call("DEL", api, "shop", &conf).code, Some(0));
    api.delete_netns();
    let again = call("DEL", api, "shop", &conf);
    assert_eq!(again.code, Some(0), "{again:?}");
    assert!(listed(&agent, "shop.api").is_none());
    assert!(attached_programs(&api.cgroup).is_empty());
    assert!(!node.pin_root().join("shop~api").exists(), "pins left");
    assert!(
        !node.state_dir().join("pods/shop.api.json").exists(),
        "record left"
    );
    assert_ne!(call("CHECK", web, "kube-system", &conf).code, Some(0));
    assert!(agent.stop().success());
    uninstall(&node);
}

#[test]
fn without_the_agent_add_fails_closed_unless_the_network_says_fail_open() {
    let Some(node) = require_root("cni_agent_down").then(|| Node::kubelet(&[("web", "burstable")]))
    else {
        return;
    };
    let web = node.pod("web");
    let conf = net_conf(web, &node.admin_socket(), false);
    let out = call("ADD", web, "shop", &conf);
    assert_ne!(out.code, Some(0), "ADD succeeded with no agent: {out:?}");
    let err: Value = serde_json::from_str(&out.stdout).expect("a CNI error on stdout");
    assert_eq!(err["code"], 11, "{err}");
    assert!(
        err["msg"].as_str().unwrap().contains("does not answer"),
        "{err}"
    );
    assert!(
        err["msg"].as_str().unwrap().contains("unprotected"),
        "{err}"
    );
    assert_ne!(
        call("STATUS", web, "shop", &conf).code,
        Some(0),
        "STATUS with no agent"
    );
    // DEL must not fail (the runtime would retry it forever); CHECK must.
    assert_eq!(call("DEL", web, "shop", &conf).code, Some(0));
    assert_ne!(call("CHECK", web, "shop", &conf).code, Some(0));
    let open = call(
        "ADD",
        web,
        "shop",
        &net_conf(web, &node.admin_socket(), true),
    );
    assert_eq!(open.code, Some(0), "{open:?}");
    assert!(open.stderr.contains("FAIL-OPEN"), "not loud: {open:?}");
    let version = call("VERSION", web, "shop", &conf);
    let v: Value = serde_json::from_str(&version.stdout).unwrap();
    assert!(v["supportedVersions"]
        .as_array()
        .unwrap()
        .iter()
        .any(|s| s == "1.0.0"));
}

#[test]
fn excluded_namespaces_are_left_alone_and_strict_pods_without_identity_are_blocked() {
    let Some(node) = require_root("cni_skip_block").then(|| {
        Node::kubelet(&[
            ("dns", "guaranteed"),
            ("bare", "burstable"),
            ("client", "besteffort"),
        ])
    }) else {
        return;
    };
    let (dns, bare, client) = (node.pod("dns"), node.pod("bare"), node.pod("client"));
    let _srv = bare.serve(&[8080]);
    let mut agent = node_agent(&node);
    let skipped = call(
        "ADD",
        dns,
        "kube-system",
        &net_conf(dns, &node.admin_socket(), false),
    );
    assert_eq!(skipped.code, Some(0), "{skipped:?}");
    assert!(listed(&agent, "kube-system.dns").is_none());
    assert!(
        attached_programs(&dns.cgroup).is_empty(),
        "an excluded pod got programs"
    );
    // STRICT namespace, no SVID mounted: enrolled, but blocked.
    let blocked = call(
        "ADD",
        bare,
        "shop",
        &net_conf(bare, &node.admin_socket(), false),
    );
    assert_eq!(blocked.code, Some(0), "{blocked:?}");
    let view = listed(&agent, "shop.bare").expect("the blocked pod is listed");
    assert_eq!(view["state"], "blocked", "{view}");
    assert!(
        view["note"]
            .as_str()
            .unwrap()
            .contains("no identity material"),
        "{view}"
    );
    assert_eq!(
        attached_programs(&bare.cgroup).len(),
        4,
        "connect4/6 and sendmsg4/6 pinned"
    );
    assert_eq!(
        call(
            "CHECK",
            bare,
            "shop",
            &net_conf(bare, &node.admin_socket(), false)
        )
        .code,
        Some(0),
        "a blocked pod is attached"
    );
    // Never served in plaintext: neither from the node nor from another pod...
    let to = at(bare, false, 8080);
    assert_eq!(
        node.host_client(to, &[]).ok,
        0,
        "plaintext reached the blocked pod"
    );
    assert_eq!(client.client(to, &[]).ok, 0);
    // ...and the blocked pod's own connects are refused.
    assert_eq!(bare.client(at(client, false, 9), &[]).ok, 0);
    let conf = net_conf(bare, &node.admin_socket(), false);
    assert_eq!(call("DEL", bare, "shop", &conf).code, Some(0));
    assert!(listed(&agent, "shop.bare").is_none());
    assert!(
        attached_programs(&bare.cgroup).is_empty(),
        "pins left after DEL"
    );
    assert!(agent.stop().success());
    uninstall(&node);
}
