//! Sidecar mode on a simulated node: `agent init` (an init container with only CAP_BPF,
//! CAP_PERFMON and CAP_NET_ADMIN) leaves its pod fail-closed and exits; `agent run --sidecar` (the native
//! sidecar, same capabilities) adopts the pins and serves the pod, so the application's
//! first connection is already intercepted; killing the sidecar leaves the pod closed.

mod common;

use std::process::Command;

use common::*;
use simnode::{command_in, workspace_bin, Agent, AgentConfig, Node, Pod};

/// The pod's own view of itself, as a container in it would pass it.
const OWN_POD: &str = "name=app,netns=/proc/self/ns/net,cgroup=auto";

/// A container of `pod` (a sub-cgroup `container`, the pod's netns) running `agent ARGS`
/// with no capability beyond CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN (without CAP_PERFMON,
/// 6.1 and 6.12 reject connect4: found in `cargo xtask vm`).
fn container(pod: &Pod, container: &str) -> Command {
    let mut cmd = command_in(
        Some(&pod.sub_cgroup(container)),
        Some(&pod.netns_path),
        "setpriv",
    );
    cmd.arg("--bounding-set=-all,+bpf,+perfmon,+net_admin")
        .arg("--")
        .arg(workspace_bin("agent"));
    cmd
}

fn refused(node: &Node, app: &Pod, peer: &Pod) {
    let out = app.client(at(peer, false, 8080), &[]);
    assert_eq!(out.ok, 0, "the pod got out while closed: {out:?}");
    let inb = node.host_client(at(app, false, 8080), &[]);
    assert_eq!(inb.ok, 0, "plaintext reached the closed pod: {inb:?}");
}

#[test]
fn init_leaves_the_pod_closed_and_the_sidecar_adopts_and_serves_it() {
    let Some(node) = node("sidecar_mode", &["app", "peer"]) else {
        return;
    };
    let (app, peer) = (node.pod("app"), node.pod("peer"));
    let _peer_srv = peer.serve(&[8080]);
    let _app_srv = app.serve(&[8080]);
    let init = container(app, "init")
        .args(["init", "--pod", OWN_POD, "--pin-root"])
        .arg(node.pin_root())
        .output()
        .expect("run agent init");
    assert!(
        init.status.success(),
        "agent init failed: {}",
        String::from_utf8_lossy(&init.stderr)
    );
    assert!(String::from_utf8_lossy(&init.stdout).contains("pod app is fail-closed"));
    refused(&node, app, peer);

    let cfg = AgentConfig::new(&node);
    let start = |c: &AgentConfig| {
        Agent::start_cmd_args(
            container(app, "sidecar"),
            c,
            &["--sidecar", "--pod", OWN_POD],
        )
    };
    let mut sidecar = start(&cfg);
    sidecar.wait_for(
        "adoption of init's pins",
        |e| e["message"] == "adopted the pod from a previous agent" && e["pod"] == "app",
        WAIT,
    );
    // The application starts once the sidecar is ready: its first connection is
    // intercepted, in both directions.
    let mut first = command_in(
        Some(&app.sub_cgroup("main")),
        Some(&app.netns_path),
        workspace_bin("podapp"),
    );
    first.args(["client", "--to", &at(peer, false, 8080).to_string()]);
    let out = first.output().expect("the app's first connection");
    let summary: simnode::proto::Summary =
        serde_json::from_slice(&out.stdout).expect("podapp summary");
    let r = only(&summary.results);
    assert!(
        redirected(r),
        "the app's first connection was not intercepted: {r:?}"
    );
    record(&sidecar, &r.local, at(peer, false, 8080));
    let inb = node.host_client(at(app, false, 8080), &[]);
    assert!(only(&inb.results).ok());
    assert!(sidecar.access().iter().any(|e| e["direction"] == "inbound"));

    sidecar.kill();
    refused(&node, app, peer);
    let restarted = start(&cfg);
    assert!(redirected(only(
        &app.client(at(peer, false, 8080), &[]).results
    )));
    drop(restarted);
    uninstall(&node);
}
