//! On a real container runtime (containerd through CRI, real CNI plugins, as a kubelet
//! drives them): the node agent runs as the DaemonSet pod of `deploy/` (its init container
//! installs agent-cni into the node's conflist), and application pods created through CRI
//! are enrolled by the plugin: mutual TLS between them, fail-closed when the agent cannot
//! enrol, served again after the agent is killed, released when deleted.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::{ConfigMap, Pod},
};
use serde_json::Value;
use simnode::{
    capture::{contains, Capture},
    cri::{kubelet::RunningPod, RuntimeNode},
    image,
    pki::DevCa,
    require_root, workspace_bin,
};

const TD: &str = "spiffe://cluster.local/ns";

fn deploy(file: &str) -> Vec<serde_yaml_ng::Value> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).expect("YAML"))
        .collect()
}

fn of_kind<T: serde::de::DeserializeOwned>(docs: &[serde_yaml_ng::Value], kind: &str) -> T {
    let doc = docs
        .iter()
        .find(|d| d["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind}"));
    serde_yaml_ng::from_value(doc.clone()).expect("a valid manifest (manifests.rs checks them)")
}

/// The node agent, as the shipped manifests deploy it, on a test node: its host paths are
/// the test's own, and its config (the ConfigMap) names this node's pod network.
struct NodeAgent {
    pod: Pod,
    running: Option<RunningPod>,
    run_dir: PathBuf,
}

impl NodeAgent {
    fn deploy(rn: &mut RuntimeNode) -> NodeAgent {
        let archive = image::agent(
            workspace_bin("agent").parent().unwrap(),
            &rn.node.tmp().join("images"),
        )
        .unwrap_or_else(|e| panic!("agent image: {e}"));
        rn.containerd().import(&archive.0);
        let mut cm: ConfigMap = of_kind(&deploy("configmap.yaml"), "ConfigMap");
        let data = cm.data.as_mut().expect("data");
        let mut config: toml::Table = data["agent.toml"].parse().expect("agent.toml");
        // The operator's edits for this node: its pod network is the mesh, STRICT `shop`.
        config.insert("mesh_networks".into(), vec![rn.pod_cidr()].into());
        config["node"]
            .as_table_mut()
            .expect("[node]")
            .insert("strict_namespaces".into(), vec!["shop"].into());
        data.insert("agent.toml".into(), toml::to_string(&config).expect("TOML"));
        let ds: DaemonSet = of_kind(&deploy("daemonset.yaml"), "DaemonSet");
        let template = ds.spec.expect("spec").template;
        let mut meta = template.metadata.unwrap_or_default();
        meta.name = Some(format!("agent-{}", rn.node.id));
        meta.namespace = Some("agent-system".into());
        let mut pod = Pod {
            metadata: meta,
            spec: template.spec,
            ..Default::default()
        };
        let run_dir = rn.node.tmp().join("run-agent");
        // The plugin runs on the host and reaches the socket at its host path: here, ours.
        let init = &mut pod.spec.as_mut().unwrap().init_containers.as_mut().unwrap()[0];
        for a in init.command.iter_mut().flatten() {
            if a == "/run/agent/admin.sock" {
                *a = run_dir.join("admin.sock").display().to_string();
            }
        }
        std::fs::create_dir_all(rn.node.pin_root()).expect("pin root");
        let (bin, conf) = (
            rn.containerd().cni_bin.clone(),
            rn.containerd().cni_conf.clone(),
        );
        let pin_root = rn.node.pin_root().to_path_buf();
        let k = rn.kubelet_mut();
        k.add_config_map(cm);
        k.map_host_path("/opt/cni/bin", &bin);
        k.map_host_path("/etc/cni/net.d", &conf);
        k.map_host_path("/run/agent", &run_dir);
        k.map_host_path("/sys/fs/bpf", &pin_root);
        let mut agent = NodeAgent {
            pod,
            running: None,
            run_dir,
        };
        agent.start(rn);
        agent
    }

    fn start(&mut self, rn: &RuntimeNode) {
        let uid = rn.new_uid();
        let running = rn.kubelet().run(&self.pod, &uid).unwrap_or_else(|e| {
            panic!(
                "the agent's DaemonSet pod: {e}\n{}",
                rn.containerd().log_tail()
            )
        });
        rn.kubelet()
            .wait_ready(&self.pod, &running)
            .unwrap_or_else(|e| panic!("the agent never got ready: {e}"));
        self.running = Some(running);
    }

    fn socket(&self) -> PathBuf {
        self.run_dir.join("admin.sock")
    }

    fn cli(&self, args: &[&str]) -> (i32, String) {
        let out = std::process::Command::new(workspace_bin("agent"))
            .args(args)
            .arg("--socket")
            .arg(self.socket())
            .output()
            .expect("agent CLI");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    }

    fn pods(&self) -> Vec<Value> {
        let (code, out) = self.cli(&["pods", "-o", "json"]);
        assert_eq!(code, 0, "agent pods: {out}");
        serde_json::from_str::<Value>(&out)
            .unwrap()
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// The agent container's log lines that are JSON (CRI log lines carry a prefix).
    fn events(&self, rn: &RuntimeNode) -> Vec<Value> {
        rn.kubelet()
            .log(self.running.as_ref().expect("running"), "agent")
            .lines()
            .filter_map(|l| l.splitn(4, ' ').nth(3))
            .filter_map(|j| serde_json::from_str(j).ok())
            .collect()
    }

    fn stop(&mut self, rn: &RuntimeNode) {
        if let Some(r) = self.running.take() {
            rn.kubelet().delete_pod(&self.pod, &r);
        }
    }
}

/// An application pod: podapp serving on 8080, its SVID where a CSI driver mounts it.
fn app_pod(name: &str, namespace: &str) -> Pod {
    serde_yaml_ng::from_str(&format!(
        r#"
apiVersion: v1
kind: Pod
metadata: {{ name: {name}, namespace: {namespace} }}
spec:
  containers:
    - name: app
      image: simnode-app:1
      command: ["/podapp", "serve", "--listen", "0.0.0.0:8080"]
      volumeMounts: [{{ name: spiffe, mountPath: /var/run/spiffe, readOnly: true }}]
  volumes:
    - name: spiffe
      csi: {{ driver: spiffe.csi.cert-manager.io, readOnly: true }}
"#
    ))
    .expect("pod YAML")
}

struct App {
    running: RunningPod,
}

impl App {
    fn ip(&self) -> String {
        self.running.ip.clone().expect("a pod address")
    }

    /// One connection from inside this pod's container to `to`.
    fn client(&self, rn: &RuntimeNode, to: &str, args: &[&str]) -> simnode::proto::Summary {
        let mut cmd = vec!["/podapp", "client", "--to", to];
        cmd.extend_from_slice(args);
        let (_, out, err) = rn
            .kubelet()
            .cri
            .exec(self.running.container("app"), &cmd, Duration::from_secs(60))
            .expect("exec podapp client");
        serde_json::from_str(out.trim())
            .unwrap_or_else(|e| panic!("podapp client: {e}: {out}{err}"))
    }
}

fn run_app(rn: &RuntimeNode, ca: &DevCa, name: &str, namespace: &str) -> Result<App, String> {
    let uid = rn.new_uid();
    let k = rn.kubelet();
    ca.issue(
        &format!("{TD}/{namespace}/sa/{name}"),
        &k.csi_dir(&uid, "spiffe"),
        false,
    );
    let pod = app_pod(name, namespace);
    k.run(&pod, &uid).map(|running| App { running })
}

/// The network namespace of a runtime's pod, found by its address.
fn netns_of(ip: &str) -> PathBuf {
    for e in std::fs::read_dir("/var/run/netns")
        .expect("/var/run/netns")
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        let out = std::process::Command::new("ip")
            .args(["-n", &name, "-4", "-o", "addr"])
            .output()
            .unwrap();
        if String::from_utf8_lossy(&out.stdout).contains(&format!(" {ip}/")) {
            return e.path();
        }
    }
    panic!("no network namespace has {ip}");
}

#[test]
fn the_daemonset_enrols_runtime_pods_which_speak_mtls_and_are_released_on_delete() {
    if !require_root("runtime_node_mode") {
        return;
    }
    let mut rn = RuntimeNode::new();
    let mut agent = NodeAgent::deploy(&mut rn);
    let conflist =
        std::fs::read_to_string(rn.containerd().cni_conf.join("10-simnode.conflist")).unwrap();
    assert!(
        conflist.contains("agent-cni"),
        "install-cni did not chain the plugin: {conflist}"
    );
    let ca = DevCa::named(&rn.node.tmp().join("ca"), "cluster.local");
    let web = run_app(&rn, &ca, "web", "shop").unwrap_or_else(|e| {
        panic!(
            "web: {e}\nagent log:\n{}\nrun dir: {:?}",
            rn.kubelet().log(agent.running.as_ref().unwrap(), "agent"),
            std::fs::read_dir(&agent.run_dir)
                .map(|d| d.flatten().map(|e| e.path()).collect::<Vec<_>>())
        )
    });
    let api = run_app(&rn, &ca, "api", "shop").unwrap_or_else(|e| panic!("api: {e}"));
    let pods = agent.pods();
    for app in [&web, &api] {
        let name = format!("shop.{}", app.running.name);
        let p = pods
            .iter()
            .find(|p| p["name"] == name.as_str())
            .unwrap_or_else(|| panic!("{name} not enrolled: {pods:?}"));
        assert_eq!(p["kubernetes"]["uid"], app.running.uid.as_str());
        assert_eq!(p["kubernetes"]["namespace"], "shop");
        assert_eq!(p["identity"], format!("{TD}/shop/sa/{}", app.running.name));
        assert_eq!(p["source"], "cni");
    }
    let to = format!("{}:8080", api.ip());
    let marker = b"SEED 424242";
    let cap = Capture::start_in(&netns_of(&api.ip()));
    let r = web.client(
        &rn,
        &to,
        &["--seed", "424241", "--send", "20000", "--reply", "20000"],
    );
    let wire = cap.stop();
    assert_eq!(r.ok, 1, "{r:?}");
    assert!(
        !contains(&wire, marker),
        "application bytes in clear between the pods"
    );
    let access: Vec<Value> = agent
        .events(&rn)
        .into_iter()
        .filter(|e| e["target"] == "access")
        .collect();
    let out = access
        .iter()
        .find(|e| e["pod"] == "shop.web" && e["direction"] == "outbound")
        .unwrap_or_else(|| panic!("no outbound record: {access:?}"));
    assert_eq!(out["tls"], "mtls");
    assert_eq!(out["peer_identity"], format!("{TD}/shop/sa/api"));
    // A plaintext client outside the mesh (the node) is refused by the STRICT pod.
    let node_client = rn.node.host_client(to.parse::<SocketAddr>().unwrap(), &[]);
    assert_eq!(
        node_client.ok, 0,
        "plaintext from the node reached a STRICT pod"
    );
    // Deleting a pod (CNI DEL twice) releases it; nothing of it stays.
    rn.kubelet().delete(&api.running);
    let pods = agent.pods();
    assert!(!pods.iter().any(|p| p["name"] == "shop.api"), "{pods:?}");
    assert!(
        !rn.node.pin_root().join("agent/shop~api").exists(),
        "pins of the deleted pod"
    );
    assert!(
        !agent.run_dir.join("pods/shop.api.json").exists(),
        "its record"
    );
    rn.kubelet().delete(&web.running);
    agent.stop(&rn);
    let conflist =
        std::fs::read_to_string(rn.containerd().cni_conf.join("10-simnode.conflist")).unwrap();
    assert!(
        !conflist.contains("agent-cni"),
        "preStop did not uninstall the plugin: {conflist}"
    );
}

impl NodeAgent {
    /// SIGKILL, as an OOM kill or a node agent crash looks.
    fn kill(&self, rn: &RuntimeNode) {
        let r = self.running.as_ref().expect("running");
        rn.kubelet()
            .cri
            .stop_container(r.container("agent"), 0)
            .expect("kill the agent container");
    }

    /// The kubelet restarts the container, and the agent gets ready again.
    fn restart(&mut self, rn: &RuntimeNode) {
        let mut r = self.running.take().expect("running");
        rn.kubelet()
            .restart(&self.pod, &mut r, "agent")
            .expect("restart the agent container");
        rn.kubelet()
            .wait_ready(&self.pod, &r)
            .unwrap_or_else(|e| panic!("the restarted agent never got ready: {e}"));
        self.running = Some(r);
    }
}

#[test]
fn with_the_agent_down_a_pod_never_starts_and_the_runtimes_retry_succeeds_once_it_is_back() {
    if !require_root("runtime_agent_down") {
        return;
    }
    let mut rn = RuntimeNode::new();
    let mut agent = NodeAgent::deploy(&mut rn);
    let ca = DevCa::named(&rn.node.tmp().join("ca"), "cluster.local");
    agent.kill(&rn);
    let uid = rn.new_uid();
    ca.issue(
        &format!("{TD}/shop/sa/web"),
        &rn.kubelet().csi_dir(&uid, "spiffe"),
        false,
    );
    let pod = app_pod("web", "shop");
    let err = match rn.kubelet().run(&pod, &uid) {
        Err(e) => e,
        Ok(_) => panic!("a pod started while the agent could not protect it"),
    };
    assert!(
        err.contains("agent-cni") && err.contains("does not answer"),
        "{err}"
    );
    let sandboxes = rn.kubelet().cri.list_pods().unwrap();
    assert!(
        !sandboxes
            .iter()
            .any(|p| p.metadata.as_ref().is_some_and(|m| m.uid == uid)),
        "the failed sandbox is left: {sandboxes:?}"
    );
    agent.restart(&rn);
    let started = Instant::now();
    let running = rn
        .kubelet()
        .run_retrying(&pod, &uid, Instant::now() + Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("the retry did not succeed: {e}"));
    println!(
        "the runtime's retry succeeded {:?} after the agent came back",
        started.elapsed()
    );
    assert!(agent.pods().iter().any(|p| p["name"] == "shop.web"));
    rn.kubelet().delete(&running);
    agent.stop(&rn);
}

#[test]
fn a_killed_agent_leaks_no_plaintext_and_the_restarted_one_serves_the_pods_again() {
    if !require_root("runtime_agent_restart") {
        return;
    }
    let mut rn = RuntimeNode::new();
    let mut agent = NodeAgent::deploy(&mut rn);
    let ca = DevCa::named(&rn.node.tmp().join("ca"), "cluster.local");
    let web = run_app(&rn, &ca, "web", "shop").unwrap_or_else(|e| panic!("web: {e}"));
    let api = run_app(&rn, &ca, "api", "shop").unwrap_or_else(|e| panic!("api: {e}"));
    let to = format!("{}:8080", api.ip());
    assert_eq!(web.client(&rn, &to, &[]).ok, 1);
    // pod web's loop against pod api, on its own CRI connection.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (socket, web_ctr, to2, flag) = (
        rn.containerd().socket.clone(),
        web.running.container("app").to_string(),
        to.clone(),
        stop.clone(),
    );
    let looper = std::thread::spawn(move || {
        let cri = simnode::cri::Cri::connect(&socket).expect("CRI");
        let mut seen = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(90);
        for _ in 0..2000 {
            if flag.load(std::sync::atomic::Ordering::Relaxed) || Instant::now() > deadline {
                break;
            }
            let t = Instant::now();
            let ok = cri
                .exec(
                    &web_ctr,
                    &["/podapp", "client", "--to", &to2],
                    Duration::from_secs(20),
                )
                .is_ok_and(|(_, out, _)| out.contains("\"ok\":1"));
            seen.push((t, ok));
            std::thread::sleep(Duration::from_millis(50));
        }
        seen
    });
    std::thread::sleep(Duration::from_millis(500));
    let killed = Instant::now();
    agent.kill(&rn);
    std::thread::sleep(Duration::from_secs(1));
    for _ in 0..3 {
        let r = rn
            .node
            .host_client(to.parse::<SocketAddr>().unwrap(), &["--send", "10"]);
        assert_eq!(
            r.ok, 0,
            "plaintext reached a fail-closed pod with its agent dead"
        );
    }
    let restarting = Instant::now();
    agent.restart(&rn);
    let deadline = Instant::now() + Duration::from_secs(20);
    while web.client(&rn, &to, &[]).ok != 1 {
        assert!(
            Instant::now() < deadline,
            "the restarted agent never served the pods"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let seen = looper.join().unwrap();
    let flowing = seen
        .iter()
        .find(|(t, ok)| *ok && *t > killed)
        .map(|(t, _)| *t);
    let down: Vec<bool> = seen
        .iter()
        .filter(|(t, _)| *t > killed + Duration::from_millis(200) && *t < restarting)
        .map(|(_, ok)| *ok)
        .collect();
    assert!(
        !down.contains(&true),
        "a connection got through with the agent dead: {down:?}"
    );
    println!(
        "gap: {} of {} loop connections failed; traffic flowed again {:.2} s after the kill ({:.2} s after the restart began)",
        seen.iter().filter(|(_, ok)| !ok).count(),
        seen.len(),
        flowing.map_or(f64::NAN, |t| t.duration_since(killed).as_secs_f64()),
        flowing.map_or(f64::NAN, |t| t.saturating_duration_since(restarting).as_secs_f64()),
    );
    let pods = agent.pods();
    for name in ["shop.web", "shop.api"] {
        let p = pods
            .iter()
            .find(|p| p["name"] == name)
            .unwrap_or_else(|| panic!("{name}: {pods:?}"));
        assert_eq!(p["source"], "state", "{p}");
    }
    rn.kubelet().delete(&web.running);
    rn.kubelet().delete(&api.running);
    agent.stop(&rn);
}

#[test]
fn sidecar_mode_intercepts_the_apps_first_connection_and_stays_closed_without_the_sidecar() {
    if !require_root("runtime_sidecar") {
        return;
    }
    let mut rn = RuntimeNode::new();
    let archive = image::agent(
        workspace_bin("agent").parent().unwrap(),
        &rn.node.tmp().join("images"),
    )
    .unwrap_or_else(|e| panic!("agent image: {e}"));
    rn.containerd().import(&archive.0);
    let docs = deploy("sidecar-pod.yaml");
    let mut pod: Pod = of_kind(&docs, "Pod");
    // As shipped: the mesh is 10.244.0.0/16, so the plain peer below (10.214.x) is
    // outside it and reached without mutual TLS, through the sidecar.
    let cm: ConfigMap = of_kind(&docs, "ConfigMap");
    // The example's application is ours: podapp serving on 8080.
    let app = &mut pod.spec.as_mut().unwrap().containers[0];
    app.image = Some("simnode-app:1".into());
    app.command = Some(vec![
        "/podapp".into(),
        "serve".into(),
        "--listen".into(),
        "0.0.0.0:8080".into(),
    ]);
    std::fs::create_dir_all(rn.node.pin_root()).unwrap();
    let pin_root = rn.node.pin_root().to_path_buf();
    rn.kubelet_mut().add_config_map(cm);
    rn.kubelet_mut().map_host_path("/sys/fs/bpf", &pin_root);
    // A plain pod to talk to (no node agent here: only the sidecar pod is mediated).
    let peer_pod = app_pod("peer", "default");
    let peer = rn
        .kubelet()
        .run(&peer_pod, &rn.new_uid())
        .expect("peer pod");
    let uid = rn.new_uid();
    let ca = DevCa::named(&rn.node.tmp().join("ca"), "cluster.local");
    ca.issue(
        &format!("{TD}/default/sa/web"),
        &rn.kubelet().csi_dir(&uid, "spiffe"),
        false,
    );
    let mut web = rn
        .kubelet()
        .run(&pod, &uid)
        .unwrap_or_else(|e| panic!("the sidecar pod: {e}\n{}", rn.containerd().log_tail()));
    let to = format!("{}:8080", peer.ip.clone().unwrap());
    let client = |web: &RunningPod| {
        let (_, out, err) = rn
            .kubelet()
            .cri
            .exec(
                web.container("web"),
                &["/podapp", "client", "--to", &to],
                Duration::from_secs(30),
            )
            .expect("exec");
        serde_json::from_str::<simnode::proto::Summary>(out.trim())
            .unwrap_or_else(|e| panic!("podapp client: {e}: {out}{err}"))
    };
    // The application's very first connection is already intercepted.
    let first = client(&web);
    assert_eq!(first.ok, 1, "{first:?}");
    let local: SocketAddr = first.results[0].local.parse().unwrap();
    assert!(
        local.ip().is_loopback(),
        "the app's first connection was not intercepted: {first:?}"
    );
    // Without the sidecar the pod is closed both ways; the kubelet's restart serves it.
    rn.kubelet()
        .cri
        .stop_container(web.container("agent"), 0)
        .expect("kill the sidecar");
    assert_eq!(client(&web).ok, 0, "the pod got out without its sidecar");
    let inbound = rn.node.host_client(
        format!("{}:8080", web.ip.clone().unwrap()).parse().unwrap(),
        &[],
    );
    assert_eq!(
        inbound.ok, 0,
        "plaintext reached the pod without its sidecar"
    );
    rn.kubelet()
        .restart(&pod, &mut web, "agent")
        .expect("restart the sidecar");
    let deadline = Instant::now() + Duration::from_secs(20);
    while client(&web).ok != 1 {
        assert!(
            Instant::now() < deadline,
            "the restarted sidecar never served the pod:\n{}",
            rn.kubelet().log(&web, "agent")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    rn.kubelet().delete(&web);
    rn.kubelet().delete(&peer);
}
