//! Least privilege as an application in an enrolled pod sees it: a process that is not
//! root can neither read the pod's private key nor talk to the agent's admin API.

mod common;

use std::os::unix::fs::PermissionsExt;

use common::*;
use simnode::{pki::DevCa, Agent, AgentConfig};

/// Lets others traverse (not list) `dir`, so that only the file's own mode decides.
fn traversable(dir: &std::path::Path) {
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", dir.display()));
}

#[test]
fn a_non_root_process_in_an_enrolled_pod_cannot_read_keys_or_use_the_admin_socket() {
    let Some(node) = node("privilege_non_root", &["a"]) else {
        return;
    };
    let a = node.pod("a");
    let ca = DevCa::new(&node.tmp().join("ca"));
    let svid = ca.issue(
        "spiffe://td.test/ns/default/sa/a",
        &node.tmp().join("a"),
        false,
    );
    let mut agent = Agent::start(&AgentConfig::new(&node).pod_extra(a, "closed", &svid.toml()));
    for dir in [node.tmp(), &node.tmp().join("a")] {
        traversable(dir);
    }
    let key = svid.key();
    let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the key {} is mode {mode:o}", key.display());
    let socket = node.admin_socket();
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the admin socket is mode {mode:o}");

    // As `nobody`, inside the pod's cgroup and network namespace.
    let as_nobody = |program: &str, args: &[&str]| {
        let out = a
            .command("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "--",
                program,
            ])
            .args(args)
            .output()
            .expect("run setpriv");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (code, out) = as_nobody("cat", &[&key.display().to_string()]);
    assert_ne!(code, Some(0), "nobody read the private key: {out}");
    assert!(out.contains("Permission denied"), "{out}");
    assert!(!out.contains("PRIVATE KEY"), "{out}");

    let sock = socket.display().to_string();
    // The same request both times: only who asks differs.
    let status_request = [
        "-sS",
        "--max-time",
        "5",
        "--unix-socket",
        &sock,
        "http://agent/status",
    ];
    let (code, out) = as_nobody("curl", &status_request);
    assert_ne!(code, Some(0), "nobody reached the admin API: {out}");
    assert!(
        out.contains("Permission denied") || out.contains("Couldn't connect"),
        "{out}"
    );
    // The same request as root works, so the refusal above is the permission, not the URL.
    let root = std::process::Command::new("curl")
        .args(status_request)
        .output()
        .unwrap();
    assert!(root.status.success(), "{root:?}");
    assert!(agent.stop().success());
}
