//! State that survives the agent: a restarted agent (after SIGKILL) re-adopts the pods
//! enrolled at runtime from its state directory, with no config of them, and a fail-closed
//! pod is never reachable in plaintext in between; a corrupt state file is reported and
//! the pod it names stays protected.

mod common;

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use common::*;
use simnode::{pki::DevCa, Agent, AgentConfig, Enrol, Node, Pod};

const TD: &str = "spiffe://td.test/ns/default/sa";

fn config(node: &Node) -> AgentConfig {
    AgentConfig::new(node).mesh()
}

/// The node itself tries plaintext to `to` a few times: every try must fail.
fn never_plaintext(node: &Node, to: SocketAddr, when: &str) {
    for _ in 0..3 {
        let r = node.host_client(to, &["--send", "10", "--reply", "10"]);
        assert_eq!(
            r.ok, 0,
            "{when}: plaintext from the node reached {to}: {r:?}"
        );
    }
}

/// When each connection of a loop started, and whether it succeeded.
type Tries = Arc<Mutex<Vec<(Instant, bool)>>>;

/// One connection attempt per iteration from `pod` to `to`, until `stop` (bounded in count
/// and time).
fn client_loop(
    pod: &Pod,
    to: SocketAddr,
    stop: Arc<AtomicBool>,
) -> (std::thread::JoinHandle<()>, Tries) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = seen.clone();
    let cmd_pod = pod.clone();
    let handle = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(90);
        for _ in 0..2000 {
            if stop.load(Ordering::Relaxed) || Instant::now() > deadline {
                break;
            }
            let started = Instant::now();
            let r = cmd_pod.client(to, &["--send", "50", "--reply", "50"]);
            sink.lock().unwrap().push((started, r.ok == 1));
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    (handle, seen)
}

#[test]
fn a_restarted_agent_readopts_runtime_pods_and_the_fail_closed_one_never_leaks() {
    let Some(node) = node("restart_readopts", &["a", "b", "c"]) else {
        return;
    };
    let (a, b, c) = (node.pod("a"), node.pod("b"), node.pod("c"));
    let ca = DevCa::new(&node.tmp().join("ca"));
    let ids: Vec<_> = ["a", "b", "c"]
        .iter()
        .map(|n| ca.issue(&format!("{TD}/{n}"), &node.tmp().join(n), false))
        .collect();
    // The STRICT pod's application records every connection as it arrives: nothing may
    // reach it except through its agent, before, during or after the kill.
    let witness = c.record(&[8080], &[]);
    let to = at(c, false, 8080);
    let mut first = Agent::start(&config(&node));
    first.enroll_ok(&Enrol::pod(a).fail_mode("open").identity(&ids[0]));
    first.enroll_ok(&Enrol::pod(b).fail_mode("open").identity(&ids[1]));
    first.enroll_ok(&Enrol::pod(c).fail_mode("closed").strict(&ids[2]));
    for p in [a, b] {
        assert!(only(&p.client(to, &[]).results).ok());
    }
    let stop = Arc::new(AtomicBool::new(false));
    let (looper, seen) = client_loop(a, to, stop.clone());
    std::thread::sleep(Duration::from_millis(500));
    let killed = Instant::now();
    first.kill();
    never_plaintext(&node, to, "agent down");
    // Down for a second (natively) while pod a's loop keeps trying.
    std::thread::sleep(simnode::time::scaled(Duration::from_secs(1)));
    let restarted = Instant::now();
    // The same node config: no pods in it at all. Everything comes from the state dir.
    let second = Agent::start(&config(&node));
    let ready = Instant::now();
    never_plaintext(&node, to, "agent restarted");
    let deadline = Instant::now() + simnode::time::scaled(Duration::from_secs(20));
    while Instant::now() < deadline
        && !seen
            .lock()
            .unwrap()
            .iter()
            .any(|(t, ok)| *ok && *t > restarted)
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    stop.store(true, Ordering::Relaxed);
    looper.join().unwrap();
    let seen = seen.lock().unwrap().clone();
    let flowing = seen
        .iter()
        .find(|(t, ok)| *ok && *t > killed)
        .map(|(t, _)| *t)
        .expect("traffic never flowed again after the restart");
    println!(
        "traffic flowed again {:.2} s after the restart began ({:.2} s after the kill; agent ready after {:.2} s); {} of {} loop connections failed",
        flowing.saturating_duration_since(restarted).as_secs_f64(),
        flowing.duration_since(killed).as_secs_f64(),
        ready.duration_since(restarted).as_secs_f64(),
        seen.iter().filter(|(_, ok)| !ok).count(),
        seen.len()
    );
    let gap = flowing.saturating_duration_since(restarted);
    assert!(
        gap < simnode::time::scaled(Duration::from_secs(1)),
        "traffic took {gap:?} to flow again after the restart"
    );
    assert!(
        witness.direct().is_empty(),
        "plaintext reached the STRICT application around its agent: {:?}",
        witness.direct()
    );
    // No connection that started while no agent served the pods got through.
    let down: Vec<bool> = seen
        .iter()
        .filter(|(t, _)| {
            *t > killed + simnode::time::scaled(Duration::from_millis(100)) && *t < restarted
        })
        .map(|(_, ok)| *ok)
        .collect();
    assert!(
        down.len() >= 5,
        "too few tries while the agent was down: {down:?}"
    );
    assert!(
        !down.contains(&true),
        "a connection got through while the agent was down: {down:?}"
    );
    let pods = second.pods();
    for name in ["a", "b", "c"] {
        let p = pods
            .iter()
            .find(|p| p["name"] == name)
            .unwrap_or_else(|| panic!("{name} not re-adopted: {pods:?}"));
        assert_eq!(p["state"], "enrolled", "{p}");
        assert_eq!(p["source"], "state", "{p}");
    }
    for p in [a, b] {
        let r = p.client(to, &[]);
        let r = only(&r.results);
        let rec = record(&second, &r.local, to);
        assert_eq!(rec["tls"], "mtls", "{rec}");
    }
    second.wait_for(
        "c adopted",
        |e| e["message"] == "adopted the pod from a previous agent" && e["pod"] == "c",
        WAIT,
    );
    drop(second);
    uninstall(&node);
}

#[test]
fn a_corrupt_state_file_is_reported_and_its_fail_closed_pod_stays_protected() {
    let Some(node) = node("restart_corrupt_state", &["a", "c"]) else {
        return;
    };
    let (a, c) = (node.pod("a"), node.pod("c"));
    let ca = DevCa::new(&node.tmp().join("ca"));
    let sc = ca.issue(&format!("{TD}/c"), &node.tmp().join("c"), false);
    let _srv = c.serve(&[8080]);
    let to = at(c, false, 8080);
    let mut first = Agent::start(&config(&node));
    first.enroll_ok(&Enrol::pod(c).fail_mode("closed").strict(&sc));
    first.enroll_ok(&Enrol::pod(a).fail_mode("open"));
    first.kill();
    let record = node.state_dir().join("pods/c.json");
    std::fs::write(&record, "{\"version\": 1, \"pod_id\": ").expect("corrupt the record");
    let mut second = Agent::start(&config(&node));
    let err = second.wait_for(
        "the unreadable state file reported",
        |e| e["level"] == "ERROR" && e["path"] == record.display().to_string(),
        WAIT,
    );
    assert!(
        err["reason"].as_str().is_some_and(|r| r.contains("EOF")),
        "no reason given: {err}"
    );
    assert!(
        err["message"]
            .as_str()
            .is_some_and(|m| m.contains("agent uninstall --pod c")),
        "no advice given: {err}"
    );
    never_plaintext(&node, to, "c's record unreadable");
    let view = second
        .pods()
        .into_iter()
        .find(|p| p["name"] == "c")
        .expect("c is listed");
    assert_eq!(view["state"], "blocked", "{view}");
    assert!(
        view["note"].as_str().unwrap().contains("unreadable"),
        "{view}"
    );
    // The pod with a good record was re-adopted.
    assert!(second
        .pods()
        .iter()
        .any(|p| p["name"] == "a" && p["state"] == "enrolled"));
    // Enrolling c again brings it back, adopting its pins.
    second.enroll_ok(&Enrol::pod(c).fail_mode("closed").strict(&sc));
    assert!(second.stop().success());
    uninstall(&node);
}

#[test]
fn pins_of_a_pod_that_is_gone_are_removed_at_start_even_without_a_record() {
    let Some(node) = node("restart_stale_pins", &["gone"]) else {
        return;
    };
    let gone = node.pod("gone");
    let mut first = Agent::start(&config(&node).pod(gone, "closed"));
    first.kill();
    assert!(
        agent::ebpf::pin_dir(node.pin_root(), "gone").exists(),
        "fail-closed pins"
    );
    // No record of it (a lost state directory), and the pod is deleted meanwhile.
    std::fs::remove_file(node.state_dir().join("pods/gone.json")).expect("the record");
    gone.delete_netns();
    std::fs::remove_dir(&gone.cgroup).expect("remove the pod's cgroup");
    // The kernel lets go of a removed cgroup asynchronously.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !agent::ebpf::pins_are_stale(node.pin_root(), "gone") {
        assert!(Instant::now() < deadline, "the pins never went stale");
        std::thread::sleep(Duration::from_millis(100));
    }
    let second = Agent::start(&config(&node));
    second.wait_for(
        "the stale pins removed",
        |e| {
            e["pod"] == "gone"
                && e["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("stale pins"))
        },
        WAIT,
    );
    assert!(
        !agent::ebpf::pin_dir(node.pin_root(), "gone").exists(),
        "pins left"
    );
    assert!(second.pods().is_empty());
    drop(second);
}
