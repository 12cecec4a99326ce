//! Running the `agent-cni` plugin exactly as a container runtime does: `CNI_*` in the
//! environment, the network configuration with the previous plugin's result on stdin.

use std::{
    io::Write,
    path::Path,
    process::{Command, Stdio},
};

use serde_json::{json, Value};

use crate::{agent::CliOutput, node::Pod, workspace_bin};

/// The plugin's entry in a conflist, after a bridge/host-local pair that gave `pod` its
/// addresses (the `prevResult` a runtime passes on).
pub fn net_conf(pod: &Pod, agent_socket: &Path, fail_open: bool) -> Value {
    json!({
        "cniVersion": "1.0.0",
        "name": "simnode-pods",
        "type": "agent-cni",
        "agentSocket": agent_socket,
        "failOpen": fail_open,
        "prevResult": {
            "cniVersion": "1.0.0",
            "interfaces": [{ "name": "eth0", "sandbox": pod.netns_path }],
            "ips": [
                { "address": format!("{}/24", pod.ip4), "interface": 0 },
                { "address": format!("{}/64", pod.ip6), "interface": 0 }
            ]
        }
    })
}

/// The sandbox container id a runtime would give the pod.
pub fn sandbox_id(pod: &Pod) -> String {
    format!("sandbox{}", pod.uid.replace('-', ""))
}

/// Runs `agent-cni` with `command` (ADD, DEL, CHECK, STATUS, VERSION) for `pod` in
/// Kubernetes namespace `namespace`.
pub fn call(command: &str, pod: &Pod, namespace: &str, conf: &Value) -> CliOutput {
    let args = format!(
        "K8S_POD_INFRA_CONTAINER_ID={};K8S_POD_UID={};IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={}",
        sandbox_id(pod),
        pod.uid,
        pod.name
    );
    let mut child = Command::new(workspace_bin("agent-cni"))
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", sandbox_id(pod))
        .env("CNI_NETNS", &pod.netns_path)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/usr/lib/cni")
        .env("CNI_ARGS", args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run agent-cni");
    child
        .stdin
        .take()
        .expect("plugin stdin")
        .write_all(conf.to_string().as_bytes())
        .expect("write the network configuration");
    let out = child.wait_with_output().expect("wait for agent-cni");
    CliOutput {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}
