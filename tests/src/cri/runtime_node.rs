//! A simulated node with a real container runtime: containerd (of the test's own), the
//! reference CNI plugins with a bridge pod network of its own, the test images imported,
//! and a kubelet-like driver. Dropping it removes the pods, the runtime, the pod network's
//! bridge and the node.

use serde_json::json;

use super::{containerd::PAUSE_IMAGE, kubelet::Kubelet, Containerd, Cri};
use crate::{
    image::{self, ImageSpec},
    sys::run_quiet,
    workspace_bin, Node,
};

/// The image the tests' application containers run: `/podapp`.
pub const APP_IMAGE: &str = "docker.io/library/simnode-app:1";

pub struct RuntimeNode {
    kubelet: Option<Kubelet>,
    containerd: Option<Containerd>,
    bridge: String,
    pub node: Node,
}

impl RuntimeNode {
    /// A node whose pod network (bridge + host-local) is the primary conflist; more plugins
    /// (ours) are chained by installing them, as on a real node.
    pub fn new() -> RuntimeNode {
        let node = Node::new(&[]);
        let bridge = format!("snc{}", node.id);
        let containerd = Containerd::start(&node.tmp().join("containerd"));
        let images = node.tmp().join("images");
        let busybox = std::path::PathBuf::from("/bin/busybox");
        let pause = ImageSpec {
            name: PAUSE_IMAGE.into(),
            files: vec![(busybox.clone(), "/bin/busybox".into())],
            entrypoint: vec!["/bin/busybox".into(), "sleep".into(), "2147483647".into()],
        };
        let app = ImageSpec {
            name: APP_IMAGE.into(),
            files: vec![
                (workspace_bin("podapp"), "/podapp".into()),
                (busybox, "/bin/busybox".into()),
            ],
            entrypoint: vec!["/podapp".into()],
        };
        for spec in [pause, app] {
            let (archive, _) =
                image::build(&spec, &images).unwrap_or_else(|e| panic!("image {}: {e}", spec.name));
            containerd.import(&archive);
        }
        let subnet = format!("10.214.{}.0/24", node.subnet());
        containerd.write_conflist(
            "10-simnode.conflist",
            &json!({
                "cniVersion": "1.0.0",
                "name": "simnode-pods",
                "plugins": [{
                    "type": "bridge",
                    "bridge": bridge,
                    "isGateway": true,
                    "ipMasq": false,
                    "ipam": {
                        "type": "host-local",
                        "subnet": subnet,
                        "dataDir": node.tmp().join("cni-ipam").display().to_string(),
                    },
                }],
            }),
        );
        let cri = Cri::connect(&containerd.socket).unwrap_or_else(|e| panic!("CRI: {e}"));
        // The kubelet's default cgroup root: pods at /kubepods/<qos>/pod<uid>, as the
        // agent and its sidecar look for them; every UID is new to this run.
        let kubelet = Kubelet::new(cri, "", &node.tmp().join("kubelet"));
        RuntimeNode {
            kubelet: Some(kubelet),
            containerd: Some(containerd),
            bridge,
            node,
        }
    }

    pub fn kubelet(&self) -> &Kubelet {
        self.kubelet.as_ref().expect("running")
    }

    pub fn kubelet_mut(&mut self) -> &mut Kubelet {
        self.kubelet.as_mut().expect("running")
    }

    pub fn containerd(&self) -> &Containerd {
        self.containerd.as_ref().expect("running")
    }

    /// A pod UID no other run uses.
    pub fn new_uid(&self) -> String {
        use std::sync::atomic::{AtomicU32, Ordering};
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let id = u32::from_str_radix(&self.node.id, 16).unwrap_or(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        format!(
            "{id:08x}-{:04x}-4{:03x}-8{:03x}-{nanos:012x}",
            n & 0xffff,
            n & 0xfff,
            id & 0xfff
        )
    }

    /// The pod network's CIDR.
    pub fn pod_cidr(&self) -> String {
        format!("10.214.{}.0/24", self.node.subnet())
    }
}

impl Default for RuntimeNode {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for RuntimeNode {
    fn drop(&mut self) {
        drop(self.kubelet.take());
        drop(self.containerd.take());
        run_quiet("ip", &["link", "del", &self.bridge]);
        // runc made the pods' cgroups in the v1 hierarchies too (this host is hybrid).
        for m in crate::sys::cgroup_mounts() {
            crate::sys::remove_cgroup_dirs(&m.join(format!("simnode-{}", self.node.id)));
        }
    }
}
