//! The shipped manifests (`deploy/`) are what Kubernetes will accept: every document
//! parses into its API type with no unknown field (a typo would be silently dropped by the
//! API server's lenient decoding), the agent's config in the ConfigMaps parses, the
//! kustomization lists exactly the files there, and the minimum Kubernetes version the
//! manifests need (native sidecars: 1.29) is the one they declare. No privileges needed.

use std::path::{Path, PathBuf};

use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::{ConfigMap, Namespace, Pod, PodSpec, ServiceAccount},
};
use serde::de::DeserializeOwned;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// `spec.?.containers.?.0.image` (serde_ignored's path, `?` for each Option) as
/// `spec.containers[0].image`, the way kubectl names fields.
fn field_path(raw: &str) -> String {
    let mut out = String::new();
    for seg in raw.split('.').filter(|s| *s != "?") {
        if seg.bytes().all(|b| b.is_ascii_digit()) {
            out.push_str(&format!("[{seg}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(seg);
        }
    }
    out
}

/// One document as `T`, or every field path Kubernetes would not know.
fn strict<T: DeserializeOwned>(doc: serde_yaml_ng::Value) -> Result<T, Vec<String>> {
    let mut unknown = Vec::new();
    let parsed: Result<T, _> =
        serde_ignored::deserialize(doc, |path| unknown.push(field_path(&path.to_string())));
    match parsed {
        Ok(v) if unknown.is_empty() => Ok(v),
        Ok(_) => Err(unknown),
        Err(e) => Err(vec![format!("does not parse: {e}")]),
    }
}

/// A parsed manifest document.
enum Object {
    Namespace,
    ServiceAccount,
    ConfigMap(Box<ConfigMap>),
    DaemonSet(Box<DaemonSet>),
    Pod(Box<Pod>),
}

/// Every document of a YAML text, typed by its `kind`; errors name the field path.
fn parse(file: &str, text: &str) -> Result<Vec<Object>, String> {
    let mut out = Vec::new();
    for (i, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let value: serde_yaml_ng::Value = serde::Deserialize::deserialize(doc)
            .map_err(|e| format!("{file}[{i}]: not YAML: {e}"))?;
        let kind = value["kind"].as_str().unwrap_or("").to_string();
        let at = |paths: Vec<String>| {
            format!(
                "{file}[{i}] ({kind}): unknown or bad fields: {}",
                paths.join(", ")
            )
        };
        out.push(match kind.as_str() {
            "Namespace" => strict::<Namespace>(value)
                .map(|_| Object::Namespace)
                .map_err(at)?,
            "ServiceAccount" => strict::<ServiceAccount>(value)
                .map(|_| Object::ServiceAccount)
                .map_err(at)?,
            "ConfigMap" => strict::<ConfigMap>(value)
                .map(|c| Object::ConfigMap(Box::new(c)))
                .map_err(at)?,
            "DaemonSet" => strict::<DaemonSet>(value)
                .map(|d| Object::DaemonSet(Box::new(d)))
                .map_err(at)?,
            "Pod" => strict::<Pod>(value)
                .map(|p| Object::Pod(Box::new(p)))
                .map_err(at)?,
            other => return Err(format!("{file}[{i}]: no check for kind `{other}`: add one")),
        });
    }
    Ok(out)
}

fn manifests() -> Vec<(String, String)> {
    let mut files: Vec<_> = std::fs::read_dir(deploy_dir())
        .expect("deploy/")
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.extension().is_some_and(|e| e == "yaml") && !p.ends_with("kustomization.yaml")
        })
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read_to_string(&p).unwrap())
        })
        .collect();
    files.sort();
    files
}

/// What a pod spec needs of Kubernetes: 1.29 for native sidecars (init containers with
/// `restartPolicy: Always`), else the oldest version we support.
fn min_version(spec: &PodSpec) -> (u32, u32) {
    let sidecar = spec
        .init_containers
        .iter()
        .flatten()
        .any(|c| c.restart_policy.as_deref() == Some("Always"));
    if sidecar {
        (1, 29)
    } else {
        (1, 25)
    }
}

#[test]
fn every_manifest_parses_strictly_and_its_agent_config_is_valid() {
    let mut needs = (1, 25);
    for (file, text) in manifests() {
        let objects = parse(&file, &text).unwrap_or_else(|e| panic!("{e}"));
        for o in objects {
            match o {
                Object::ConfigMap(cm) => {
                    for (key, value) in cm.data.iter().flatten() {
                        if key.ends_with(".toml") {
                            agent::config::FileConfig::parse(Path::new(key), value)
                                .unwrap_or_else(|e| panic!("{file}: {key}: {e}"));
                        }
                    }
                }
                Object::DaemonSet(ds) => {
                    let spec = ds
                        .spec
                        .as_ref()
                        .and_then(|s| s.template.spec.as_ref())
                        .expect("pod spec");
                    needs = needs.max(min_version(spec));
                    assert_eq!(
                        spec.host_network,
                        Some(true),
                        "{file}: the node agent is on the host network"
                    );
                    let agent = &spec.containers[0];
                    let caps = agent
                        .security_context
                        .as_ref()
                        .and_then(|s| s.capabilities.as_ref())
                        .and_then(|c| c.add.clone())
                        .unwrap_or_default();
                    assert_eq!(
                        caps,
                        ["BPF", "NET_ADMIN", "SYS_ADMIN"],
                        "{file}: minimal capabilities"
                    );
                    assert!(
                        agent.security_context.as_ref().and_then(|s| s.privileged) != Some(true),
                        "{file}: not privileged"
                    );
                }
                Object::Pod(p) => {
                    let spec = p.spec.as_ref().expect("pod spec");
                    needs = needs.max(min_version(spec));
                }
                Object::Namespace | Object::ServiceAccount => {}
            }
        }
    }
    let kustomization = std::fs::read_to_string(deploy_dir().join("kustomization.yaml")).unwrap();
    let k: serde_yaml_ng::Value = serde_yaml_ng::from_str(&kustomization).unwrap();
    let declared = k["commonAnnotations"]["agent.dev/min-kubernetes-version"]
        .as_str()
        .expect("the kustomization declares the minimum Kubernetes version");
    assert_eq!(
        declared,
        format!("{}.{}", needs.0, needs.1),
        "declared vs needed"
    );
    for r in k["resources"].as_sequence().expect("resources") {
        let r = r.as_str().unwrap();
        assert!(
            deploy_dir().join(r).exists(),
            "kustomization names a missing file {r}"
        );
    }
}

#[test]
fn a_typo_is_rejected_with_the_path_of_the_field() {
    let typo = "apiVersion: apps/v1\nkind: DaemonSet\nmetadata: { name: x }\nspec:\n  selector: {}\n  template:\n    spec:\n      hostNetwrk: true\n      containers:\n        - name: agent\n          imagePullPolcy: Never\n";
    let err = match parse("typo.yaml", typo) {
        Err(e) => e,
        Ok(_) => panic!("the typos were accepted"),
    };
    assert!(err.contains("spec.template.spec.hostNetwrk"), "{err}");
    assert!(
        err.contains("spec.template.spec.containers[0].imagePullPolcy"),
        "{err}"
    );
}
