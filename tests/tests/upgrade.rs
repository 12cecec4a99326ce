//! Upgrades without dropping connections: a new agent started while one runs takes over its
//! listening sockets (SCM_RIGHTS over the handover socket) and its pinned links; the old
//! one stops accepting, drains and exits. A steady client loop through two pods, one of
//! them fail-closed and STRICT, sees no failed request across it.

mod common;

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use common::*;
use simnode::{pki::DevCa, Agent, AgentConfig};

const TD: &str = "spiffe://td.test/ns/default/sa";

#[test]
fn an_upgrade_under_a_steady_client_loop_fails_no_request() {
    let Some(node) = node("upgrade_handover", &["a", "b"]) else {
        return;
    };
    let (a, b) = (node.pod("a"), node.pod("b"));
    let ca = DevCa::new(&node.tmp().join("ca"));
    let sa = ca.issue(&format!("{TD}/a"), &node.tmp().join("a"), false);
    let sb = ca.issue(&format!("{TD}/b"), &node.tmp().join("b"), false);
    let allow = node.tmp().join("allow-all.yaml");
    let cfg = AgentConfig::new(&node)
        .mesh()
        .pod_extra(a, "open", &sa.toml())
        .pod_extra(b, "closed", &sb.toml_strict(&allow));
    let _srv = b.serve(&[8080]);
    let mut old = Agent::start(&cfg);
    let to = at(b, false, 8080);
    assert!(only(&a.client(to, &[]).results).ok());

    // Two client loops from pod a to pod b (mutual TLS between the pods' agents), ten
    // requests per process, until told to stop (bounded in count and time).
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let errors = Arc::new(std::sync::Mutex::new(Vec::new()));
    let loops: Vec<_> = (0..2)
        .map(|_| {
            let (pod, stop, ok, failed, errors) = (
                a.clone(),
                stop.clone(),
                ok.clone(),
                failed.clone(),
                errors.clone(),
            );
            std::thread::spawn(move || {
                let deadline = Instant::now() + Duration::from_secs(60);
                for _ in 0..1000 {
                    if stop.load(Ordering::Relaxed) || Instant::now() > deadline {
                        break;
                    }
                    let r = pod.client(to, &["--count", "10", "--concurrency", "2"]);
                    ok.fetch_add(r.ok, Ordering::Relaxed);
                    failed.fetch_add(r.failed, Ordering::Relaxed);
                    errors.lock().unwrap().extend(r.errors);
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(1));
    let before = ok.load(Ordering::Relaxed);
    let started = Instant::now();
    let new = Agent::start(&cfg);
    let taken_over = started.elapsed();
    let status = old.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "the old agent failed: {status:?}");
    let old_gone = started.elapsed();
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);
    for l in loops {
        l.join().unwrap();
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    println!(
        "upgrade: {ok} requests served ({} after the new agent started), {failed} failed; new agent ready after {:.2} s, old agent gone after {:.2} s",
        ok - before,
        taken_over.as_secs_f64(),
        old_gone.as_secs_f64()
    );
    assert_eq!(
        failed,
        0,
        "requests failed across the upgrade: {:?}",
        errors.lock().unwrap()
    );
    assert!(
        ok - before >= 20,
        "too few requests across the upgrade ({ok})"
    );
    // The new agent serves both pods now, on the handed-over sockets.
    new.wait_for(
        "taken over",
        |e| e["message"] == "took over from the previous agent: it stops accepting and drains",
        WAIT,
    );
    let r = a.client(to, &[]);
    let r = only(&r.results);
    let rec = record(&new, &r.local, to);
    assert_eq!(rec["tls"], "mtls", "{rec}");
    // Pod b is still fail-closed: its pinned links are the new agent's.
    let r = node.host_client(to, &[]);
    assert_eq!(
        r.ok, 0,
        "plaintext from the node reached the STRICT pod: {r:?}"
    );
    drop(new);
    uninstall(&node);
}
