//! Fault injection on a simulated node: an allow rule's `fault` aborts half of its HTTP
//! requests (within a binomial bound over 200), delays others by a measured time, and
//! resets half of a port's TCP connections; every injected fault is logged, counted and
//! shown by `agent explain`, so a rehearsal is never mistaken for an outage.

mod common;

use std::time::{Duration, Instant};

use common::*;
use simnode::{Agent, AgentConfig};

const POLICY: &str = r#"
default: deny
rules:
  - name: flaky
    action: allow
    from: { unauthenticated: true }
    to: { ports: [8080] }
    http: { paths: ["/flaky*"] }
    fault: { abort_status: 503, percent: 50 }
  - name: slow
    action: allow
    from: { unauthenticated: true }
    to: { ports: [8080] }
    http: { paths: ["/slow*"] }
    fault: { delay_ms: 400 }
  - name: tcp-flaky
    action: allow
    from: { unauthenticated: true }
    to: { ports: [9090] }
    fault: { reset: true, percent: 50 }
"#;

/// 200 trials at 50%: 100 expected, standard deviation 7.1; five of them either side
/// fail a correct implementation less than once in a million runs.
const TRIALS: u64 = 200;
const BOUND: std::ops::RangeInclusive<u64> = 65..=135;

#[test]
fn faults_abort_delay_and_reset_the_share_they_name() {
    let Some(node) = node("fault", &["a", "b"]) else {
        return;
    };
    let (a, b) = (node.pod("a"), node.pod("b"));
    let policy = node.tmp().join("b-policy.yaml");
    std::fs::write(&policy, POLICY).unwrap();
    let http = b.serve_http(&[8080]);
    let _tcp = b.serve(&[9090]);
    let cfg =
        AgentConfig::new(&node).pod_extra(b, "open", &format!("policy = \"{}\"", policy.display()));
    let mut agent = Agent::start(&cfg);

    // Half of 200 requests on one keep-alive connection are aborted with 503; the app
    // sees exactly the others.
    let requests = vec!["GET /flaky"; TRIALS as usize].join(",");
    let r = a.http_client(at(b, false, 8080), &requests, false);
    assert_eq!(r.error, None, "the connection must survive injected aborts");
    let aborted = r.statuses.iter().filter(|s| **s == 503).count() as u64;
    let served = r.statuses.iter().filter(|s| **s == 200).count() as u64;
    assert_eq!(aborted + served, TRIALS, "{:?}", r.statuses);
    assert!(
        BOUND.contains(&aborted),
        "{aborted} of {TRIALS} aborted at 50%"
    );
    assert!(r
        .bodies
        .iter()
        .any(|b| b.contains("fault injected by policy rule `flaky`")));
    assert_eq!(
        http.wait_http(served as usize).len() as u64,
        served,
        "the app saw an aborted request"
    );
    let record = agent.wait_for(
        "the flaky connection's record",
        |e| e["target"] == "access" && e["http_requests"] == TRIALS,
        WAIT,
    );
    assert_eq!(record["http_faults"], aborted, "{record}");
    let explained = agent.cli(&["explain", &record["conn"].to_string()]);
    assert!(
        explained
            .stdout
            .contains("fault injected: abort 503 for 50% (rule `flaky`)"),
        "{explained:?}"
    );

    // The delay is there, measured from the client.
    let start = Instant::now();
    let r = a.http_client(at(b, false, 8080), "GET /slow,GET /slow", false);
    let took = start.elapsed();
    assert_eq!(r.statuses, [200, 200]);
    assert!(
        took >= Duration::from_millis(800),
        "two delayed requests took {took:?}"
    );
    agent.wait_for(
        "the delay's log line",
        |e| e["message"] == "fault injected" && e["fault"] == "delay 400 ms for 100%",
        WAIT,
    );

    // Half of 200 TCP connections are reset before the app sees them.
    let s = node.host_client(at(b, false, 9090), &["--count", &TRIALS.to_string()]);
    assert!(
        BOUND.contains(&s.ok),
        "{} of {TRIALS} connections survived at 50%: {:?}",
        s.ok,
        s.errors
    );
    let logged_resets = || {
        agent
            .access()
            .iter()
            .filter(|e| e["outcome"] == "fault_injected" && e["reason"] == "reset")
            .count() as u64
    };
    let deadline = Instant::now() + WAIT;
    while logged_resets() + s.ok < TRIALS && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        logged_resets() + s.ok,
        TRIALS,
        "every failed connection is a logged injected reset"
    );
    assert!(agent.stop().success());
}
