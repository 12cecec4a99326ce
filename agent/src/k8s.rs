//! Kubernetes pods as a container runtime hands them to our CNI plugin: who the pod is
//! (namespace, name and UID from `CNI_ARGS`), where the kubelet put its cgroup, and how the
//! node's configuration turns that into a pod request (or a decision not to enrol it).
//!
//! At CNI ADD no process of the pod exists yet, so the pod is found by the pod-level
//! cgroup the kubelet created from its UID, in either of the kubelet's layouts.

use std::{
    fmt,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::types::{FailMode, Mode, PodName};

/// A pod as the runtime names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct K8sPod {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// The sandbox (pause) container's id: CNI_CONTAINERID.
    pub container_id: String,
}

/// Lower-case letters, digits, '-' and '.', as Kubernetes allows in namespace and pod names.
fn dns_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && !s.starts_with(['-', '.'])
        && !s.contains("..")
}

impl K8sPod {
    /// Checks what is spliced into paths (cgroup directories, identity and policy
    /// templates): nothing may climb out of them.
    pub fn validate(&self) -> Result<(), String> {
        if !dns_name(&self.namespace) {
            return Err(format!(
                "`{}` is not a Kubernetes namespace name",
                self.namespace
            ));
        }
        if !dns_name(&self.name) {
            return Err(format!("`{}` is not a Kubernetes pod name", self.name));
        }
        let uid_ok = !self.uid.is_empty()
            && self.uid.len() <= 64
            && self.uid.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-');
        if !uid_ok {
            return Err(format!("`{}` is not a pod UID", self.uid));
        }
        if self.container_id.is_empty()
            || !self.container_id.bytes().all(|b| b.is_ascii_alphanumeric())
        {
            return Err(format!("`{}` is not a container id", self.container_id));
        }
        Ok(())
    }

    /// The agent's name for the pod: `namespace.name`, or, when that does not fit in a
    /// pod name, a prefix of it and the start of the UID (still unique on the node).
    pub fn pod_name(&self) -> PodName {
        let full = format!("{}.{}", self.namespace, self.name);
        if let Ok(n) = PodName::parse(&full) {
            return n;
        }
        let uid: String = self.uid.chars().filter(|c| *c != '-').take(12).collect();
        let keep = 63 - uid.len() - 1;
        let prefix: String = full.chars().take(keep).collect();
        PodName::parse(&format!("{}-{uid}", prefix.trim_end_matches(['.', '-'])))
            .expect("a prefix of a valid DNS name and hex digits make a valid pod name")
    }
}

impl fmt::Display for K8sPod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{} (uid {})", self.namespace, self.name, self.uid)
    }
}

/// Where the kubelet may have put a pod's cgroup under `root` (the kubelet's cgroup root
/// on the cgroup2 mount), most common first: the cgroupfs driver (`kubepods/pod<uid>`,
/// then per QoS class) and the systemd driver (`kubepods.slice/...-pod<uid with _>.slice`).
pub fn pod_cgroup_candidates(root: &Path, uid: &str) -> Vec<PathBuf> {
    let pod = format!("pod{uid}");
    let unit = uid.replace('-', "_");
    let mut out = vec![
        root.join("kubepods").join(&pod),
        root.join("kubepods/burstable").join(&pod),
        root.join("kubepods/besteffort").join(&pod),
        root.join("kubepods.slice")
            .join(format!("kubepods-pod{unit}.slice")),
    ];
    for qos in ["burstable", "besteffort"] {
        out.push(
            root.join("kubepods.slice")
                .join(format!("kubepods-{qos}.slice"))
                .join(format!("kubepods-{qos}-pod{unit}.slice")),
        );
    }
    out
}

/// The pod's cgroup: the first candidate that exists.
pub fn find_pod_cgroup(root: &Path, uid: &str) -> Result<PathBuf, String> {
    let candidates = pod_cgroup_candidates(root, uid);
    candidates
        .iter()
        .find(|p| p.is_dir())
        .cloned()
        .ok_or_else(|| {
            format!(
                "no cgroup for pod uid {uid} under {} (looked for the kubelet's cgroupfs and systemd layouts, e.g. {}); is cgroup_root the kubelet's?",
                root.display(),
                candidates[0].display()
            )
        })
}

/// A path with `{namespace}`, `{pod}` and `{uid}` in it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Template(String);

const PLACEHOLDERS: [&str; 3] = ["{namespace}", "{pod}", "{uid}"];

impl Template {
    pub fn parse(s: &str) -> Result<Self, String> {
        if !s.starts_with('/') {
            return Err(format!("`{s}` must be an absolute path"));
        }
        // Anything in braces must be one of ours: a typo must not become a literal path.
        let mut rest = s;
        while let Some(open) = rest.find('{') {
            let close = rest[open..]
                .find('}')
                .ok_or_else(|| format!("`{s}` has an unclosed `{{`"))?;
            let word = &rest[open..open + close + 1];
            if !PLACEHOLDERS.contains(&word) {
                return Err(format!(
                    "`{s}`: unknown placeholder {word} (known: {})",
                    PLACEHOLDERS.join(", ")
                ));
            }
            rest = &rest[open + close + 1..];
        }
        Ok(Self(s.to_string()))
    }

    pub fn render(&self, pod: &K8sPod) -> PathBuf {
        PathBuf::from(
            self.0
                .replace("{namespace}", &pod.namespace)
                .replace("{pod}", &pod.name)
                .replace("{uid}", &pod.uid),
        )
    }
}

/// The node-mode settings: which pods the CNI plugin's requests enrol, and with what.
#[derive(Debug, Clone, Serialize)]
pub struct NodeMode {
    /// The kubelet's cgroup root on the cgroup2 mount.
    pub cgroup_root: PathBuf,
    /// Only these namespaces (empty: all but the excluded ones).
    pub include_namespaces: Vec<String>,
    pub exclude_namespaces: Vec<String>,
    /// Where each pod's SVID is (a directory in a layout `identity_dir` understands).
    pub identity_dir: Option<Template>,
    /// Each namespace's policy file (without one, the node's default policy).
    pub policy: Option<Template>,
    /// Namespaces whose pods accept nothing but mutual TLS.
    pub strict_namespaces: Vec<String>,
    pub mode: Mode,
    pub fail_mode: FailMode,
}

/// What to do with a pod a runtime hands over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// Not ours to mediate (an excluded namespace).
    Skip(String),
    /// Enrol it with this request.
    Enrol(crate::spec::PodRequest),
    /// Enrol it fail-closed and serve none of its traffic, for this reason.
    Block(crate::spec::PodRequest, String),
}

impl NodeMode {
    /// The decision for `pod` whose network namespace is `netns`.
    pub fn admit(&self, pod: &K8sPod, netns: &Path) -> Result<Admission, String> {
        pod.validate()?;
        let ns = &pod.namespace;
        if self.exclude_namespaces.contains(ns)
            || (!self.include_namespaces.is_empty() && !self.include_namespaces.contains(ns))
        {
            return Ok(Admission::Skip(format!("namespace {ns} is not enrolled")));
        }
        let cgroup = find_pod_cgroup(&self.cgroup_root, &pod.uid)?;
        let mode = if self.strict_namespaces.contains(ns) {
            Mode::Strict
        } else {
            self.mode
        };
        let identity_dir = self
            .identity_dir
            .as_ref()
            .map(|t| t.render(pod))
            .filter(|d| crate::identity::IdentityFiles::in_dir(d).is_ok());
        let policy = self
            .policy
            .as_ref()
            .map(|t| t.render(pod))
            .filter(|p| p.exists());
        let request = crate::spec::PodRequest {
            name: pod.pod_name().to_string(),
            netns: netns.to_path_buf(),
            cgroup,
            fail_mode: self.fail_mode,
            mode,
            identity_dir: identity_dir.clone(),
            policy,
            kubernetes: Some(pod.clone()),
            ..Default::default()
        };
        if mode == Mode::Strict && identity_dir.is_none() {
            let looked = self
                .identity_dir
                .as_ref()
                .map(|t| t.render(pod).display().to_string())
                .unwrap_or_else(|| "(no identity_dir template configured)".into());
            let mut blocked = request;
            blocked.fail_mode = FailMode::Closed;
            blocked.mode = Mode::Permissive;
            return Ok(Admission::Block(
                blocked,
                format!("STRICT namespace {ns} and no identity material at {looked}"),
            ));
        }
        Ok(Admission::Enrol(request))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(ns: &str, name: &str) -> K8sPod {
        K8sPod {
            namespace: ns.into(),
            name: name.into(),
            uid: "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0".into(),
            container_id: "abc123".into(),
        }
    }

    #[test]
    fn cgroup_layouts_of_both_kubelet_drivers() {
        let root = std::env::temp_dir().join(format!("k8s-cgroups-{}", std::process::id()));
        let uid = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0";
        let cands = pod_cgroup_candidates(&root, uid);
        let rel: Vec<String> = cands
            .iter()
            .map(|p| p.strip_prefix(&root).unwrap().display().to_string())
            .collect();
        assert!(rel.contains(&format!("kubepods/burstable/pod{uid}")));
        assert!(rel.contains(
            &"kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod0f1e2d3c_4b5a_6978_8796_a5b4c3d2e1f0.slice".to_string()
        ));
        assert!(find_pod_cgroup(&root, uid)
            .unwrap_err()
            .contains("no cgroup for pod uid"));
        // A systemd-driver layout, as the kubelet makes it.
        let dir = root.join("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0f1e2d3c_4b5a_6978_8796_a5b4c3d2e1f0.slice");
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(find_pod_cgroup(&root, uid).unwrap(), dir);
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn names_and_paths_cannot_escape() {
        assert!(pod("default", "web").validate().is_ok());
        assert!(pod("..", "web").validate().is_err());
        assert!(pod("default", "a/b").validate().is_err());
        let mut p = pod("default", "web");
        p.uid = "../../etc".into();
        assert!(p.validate().is_err());
    }

    #[test]
    fn pod_names_fit() {
        assert_eq!(pod("shop", "web-1").pod_name().as_str(), "shop.web-1");
        let long = pod(
            "a-namespace-with-a-long-name",
            "and-a-pod-with-an-even-longer-name-0",
        );
        let n = long.pod_name();
        assert!(n.as_str().len() <= 63, "{n}");
        assert!(n.as_str().ends_with("-0f1e2d3c4b5a"), "{n}");
    }

    #[test]
    fn templates() {
        let t = Template::parse("/var/lib/kubelet/pods/{uid}/volumes/spiffe/{namespace}").unwrap();
        assert_eq!(
            t.render(&pod("shop", "web")),
            PathBuf::from(
                "/var/lib/kubelet/pods/0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0/volumes/spiffe/shop"
            )
        );
        assert!(Template::parse("/x/{podname}")
            .unwrap_err()
            .contains("unknown placeholder"));
        assert!(Template::parse("relative/{pod}").is_err());
    }
}
