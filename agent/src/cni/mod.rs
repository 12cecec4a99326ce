//! The CNI chained plugin (`agent-cni`), and what it says to the node's agent.
//!
//! The plugin runs last in the pod network's plugin list (CNI spec 1.0.0). On ADD it asks
//! the agent, over the admin socket, to enrol the pod whose network namespace the runtime
//! just set up, and prints the previous plugin's result unchanged once the agent has the
//! pod protected. If the agent does not answer or refuses, ADD fails with a CNI error
//! naming the reason, so the runtime never starts the pod unprotected (unless the network
//! says `"failOpen": true`, which is loud). DEL releases the pod and succeeds however
//! often it is called, also when the agent is gone (the agent reaps pods whose namespace
//! went away by itself). CHECK fails unless the pod is enrolled and attached.

pub mod install;

use std::{collections::BTreeMap, path::PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::{k8s::K8sPod, types::DEFAULT_ADMIN_SOCKET};

/// The CNI versions whose ADD/DEL/CHECK semantics this plugin implements.
pub const SUPPORTED_VERSIONS: [&str; 4] = ["0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// What the plugin asks the agent (`POST /cni` on the admin API).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CniRequest {
    pub command: CniCommand,
    /// `CNI_NETNS` (absent on a DEL after the namespace is gone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<PathBuf>,
    pub pod: K8sPod,
    /// The pod's addresses, from `prevResult` (the agent follows the namespace's live
    /// addresses itself; these are for its log).
    #[serde(default)]
    pub ips: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum CniCommand {
    Add,
    Del,
    Check,
}

/// The network configuration the runtime hands the plugin on stdin.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    pub cni_version: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub prev_result: Option<Value>,
    /// The agent's admin socket (default `/run/agent/admin.sock`).
    #[serde(default)]
    pub agent_socket: Option<PathBuf>,
    /// Start pods even when the agent cannot protect them (logged loudly).
    #[serde(default)]
    pub fail_open: bool,
}

/// A CNI error result (printed on stdout, with a non-zero exit).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

/// Well-known CNI error codes, and ours (100 and up are the plugin's own).
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const INVALID_ENVIRONMENT: u32 = 4;
    pub const DECODING_FAILURE: u32 = 6;
    pub const INVALID_NETWORK_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    pub const NOT_AVAILABLE: u32 = 50;
    /// The agent answered and refused the pod.
    pub const REFUSED: u32 = 100;
    /// CHECK: the pod is not enrolled and attached.
    pub const NOT_ENROLLED: u32 = 101;
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }

    pub fn to_json(&self, cni_version: &str) -> Value {
        json!({ "cniVersion": cni_version, "code": self.code, "msg": self.msg, "details": self.details })
    }
}

/// `K8S_POD_NAMESPACE=..;K8S_POD_NAME=..;K8S_POD_UID=..;IgnoreUnknown=1`.
pub fn parse_cni_args(args: &str) -> BTreeMap<String, String> {
    args.split(';')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

/// The pod a runtime's environment names.
pub fn pod_from_env(container_id: &str, cni_args: &str) -> Result<K8sPod, CniError> {
    let args = parse_cni_args(cni_args);
    let get = |k: &str| {
        args.get(k).cloned().ok_or_else(|| {
            CniError::new(
                code::INVALID_ENVIRONMENT,
                format!("CNI_ARGS has no {k}"),
                "agent-cni enrols Kubernetes pods: the runtime must pass K8S_POD_NAMESPACE, K8S_POD_NAME and K8S_POD_UID (kubelet and containerd's CRI do)",
            )
        })
    };
    Ok(K8sPod {
        namespace: get("K8S_POD_NAMESPACE")?,
        name: get("K8S_POD_NAME")?,
        uid: get("K8S_POD_UID")?,
        container_id: container_id.to_string(),
    })
}

/// The addresses in a CNI result (`ips[].address`).
pub fn result_ips(result: &Value) -> Vec<String> {
    result["ips"]
        .as_array()
        .map(|ips| {
            ips.iter()
                .filter_map(|ip| ip["address"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// The plugin's environment, as the runtime sets it.
#[derive(Debug, Clone, Default)]
pub struct Env {
    pub command: String,
    pub container_id: String,
    pub netns: Option<PathBuf>,
    pub args: String,
}

impl Env {
    pub fn from_process() -> Self {
        let var = |k: &str| std::env::var(k).unwrap_or_default();
        Self {
            command: var("CNI_COMMAND"),
            container_id: var("CNI_CONTAINERID"),
            netns: std::env::var_os("CNI_NETNS")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from),
            args: var("CNI_ARGS"),
        }
    }
}

/// What the plugin does next, decided from its input alone (so it can be tested without
/// an agent): print something and exit, or ask the agent.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    Print(Value),
    Ask {
        socket: PathBuf,
        request: CniRequest,
    },
    /// STATUS: is the agent there?
    Status {
        socket: PathBuf,
    },
}

/// Reads the command and network configuration and decides the step.
pub fn plan(env: &Env, stdin: &str) -> Result<(NetConf, Step), CniError> {
    if env.command == "VERSION" {
        let conf = NetConf {
            cni_version: "1.0.0".into(),
            name: String::new(),
            prev_result: None,
            agent_socket: None,
            fail_open: false,
        };
        let v = json!({ "cniVersion": "1.0.0", "supportedVersions": SUPPORTED_VERSIONS });
        return Ok((conf, Step::Print(v)));
    }
    let conf: NetConf = serde_json::from_str(stdin).map_err(|e| {
        CniError::new(
            code::DECODING_FAILURE,
            "cannot decode the network configuration",
            e.to_string(),
        )
    })?;
    if !SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()) {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!("CNI version {} is not supported", conf.cni_version),
            format!("supported: {}", SUPPORTED_VERSIONS.join(", ")),
        ));
    }
    let socket = conf
        .agent_socket
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_ADMIN_SOCKET));
    let command = match env.command.as_str() {
        "ADD" => CniCommand::Add,
        "DEL" => CniCommand::Del,
        "CHECK" => CniCommand::Check,
        "STATUS" => return Ok((conf, Step::Status { socket })),
        other => {
            return Err(CniError::new(
                code::INVALID_ENVIRONMENT,
                format!("unknown CNI_COMMAND `{other}`"),
                "expected ADD, DEL, CHECK, STATUS or VERSION",
            ))
        }
    };
    if command == CniCommand::Add && conf.prev_result.is_none() {
        return Err(CniError::new(
            code::INVALID_NETWORK_CONFIG,
            "agent-cni must be chained after the pod network's plugins (no prevResult)",
            "put {\"type\": \"agent-cni\"} last in the conflist's plugins",
        ));
    }
    if command != CniCommand::Del && env.netns.is_none() {
        return Err(CniError::new(
            code::INVALID_ENVIRONMENT,
            "CNI_NETNS is not set",
            "the runtime must pass the pod's network namespace",
        ));
    }
    let pod = pod_from_env(&env.container_id, &env.args)?;
    let ips = conf
        .prev_result
        .as_ref()
        .map(result_ips)
        .unwrap_or_default();
    let request = CniRequest {
        command,
        netns: env.netns.clone(),
        pod,
        ips,
    };
    Ok((conf, Step::Ask { socket, request }))
}

/// What ADD prints on success: the previous result, in the configured version.
pub fn add_result(conf: &NetConf) -> Value {
    let mut r = conf.prev_result.clone().unwrap_or_else(|| json!({}));
    r["cniVersion"] = json!(conf.cni_version);
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(command: &str) -> Env {
        Env {
            command: command.into(),
            container_id: "c0ffee".into(),
            netns: Some("/var/run/netns/cni-1234".into()),
            args: "K8S_POD_INFRA_CONTAINER_ID=c0ffee;K8S_POD_UID=0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0;IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-1".into(),
        }
    }

    const CONF: &str = r#"{"cniVersion":"1.0.0","name":"pods","type":"agent-cni",
        "prevResult":{"cniVersion":"1.0.0","interfaces":[{"name":"eth0"}],
                      "ips":[{"address":"10.22.0.5/16","interface":0}]}}"#;

    #[test]
    fn add_asks_the_agent_with_the_pod_of_the_runtime() {
        let (conf, step) = plan(&env("ADD"), CONF).unwrap();
        let Step::Ask { socket, request } = step else {
            panic!("{step:?}")
        };
        assert_eq!(socket, PathBuf::from(DEFAULT_ADMIN_SOCKET));
        assert_eq!(request.command, CniCommand::Add);
        assert_eq!(request.pod.namespace, "shop");
        assert_eq!(request.pod.name, "web-1");
        assert_eq!(request.pod.container_id, "c0ffee");
        assert_eq!(request.ips, vec!["10.22.0.5/16".to_string()]);
        let out = add_result(&conf);
        assert_eq!(out["ips"][0]["address"], "10.22.0.5/16");
        assert_eq!(out["cniVersion"], "1.0.0");
    }

    #[test]
    fn refusals_are_cni_errors() {
        assert_eq!(
            plan(&env("ADD"), r#"{"cniVersion":"1.0.0","name":"n"}"#)
                .unwrap_err()
                .code,
            code::INVALID_NETWORK_CONFIG
        );
        assert_eq!(
            plan(&env("ADD"), r#"{"cniVersion":"9.9.9","name":"n"}"#)
                .unwrap_err()
                .code,
            code::INCOMPATIBLE_VERSION
        );
        let mut e = env("ADD");
        e.args = "IgnoreUnknown=1".into();
        let err = plan(&e, CONF).unwrap_err();
        assert!(err.msg.contains("K8S_POD_NAMESPACE"), "{err:?}");
        assert_eq!(
            plan(&env("ADD"), "{").unwrap_err().code,
            code::DECODING_FAILURE
        );
    }

    #[test]
    fn del_needs_no_namespace_and_version_needs_no_config() {
        let mut e = env("DEL");
        e.netns = None;
        assert!(matches!(plan(&e, CONF).unwrap().1, Step::Ask { .. }));
        let (_, step) = plan(&env("VERSION"), "").unwrap();
        let Step::Print(v) = step else { panic!() };
        assert_eq!(v["supportedVersions"][2], "1.0.0");
    }
}
