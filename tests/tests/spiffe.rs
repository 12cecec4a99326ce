//! Identities from the SPIFFE Workload API on a simulated node: a STRICT pod whose SVID
//! comes from a (stand-in) SPIRE agent's socket serves mutual TLS with it; the SVID is
//! rotated mid-traffic with zero failed connections and new handshakes present the new
//! one; a broken update is rejected and the last good SVID keeps serving; when the SPIRE
//! agent restarts the stream is re-established and the next SVID taken; an enrolment with
//! no Workload API behind the socket fails and says what to check.

mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;
use simnode::{app::client_result, pki::DevCa, spire::FakeSpire, Agent, AgentConfig, Enrol};

const TD: &str = "spiffe://td.test/ns/default/sa";

/// `agent certs` for pod `s`.
fn cert_of(agent: &Agent, pod: &str) -> Value {
    let out = agent.cli(&["certs", "-o", "json"]);
    assert_eq!(out.code, Some(0), "{out:?}");
    out.json()
        .as_array()
        .and_then(|a| a.iter().find(|c| c["pod"] == pod).cloned())
        .unwrap_or_else(|| panic!("no certificate for {pod}: {}", out.stdout))
}

/// Waits until pod `s` presents the certificate with `serial`.
fn wait_serial(agent: &Agent, serial: &str) -> Value {
    let c = settle(
        Duration::from_secs(15),
        || cert_of(agent, "s"),
        |c| c["serial"] == serial,
    );
    assert_eq!(
        c["serial"],
        serial,
        "s presents another; log:\n{}",
        agent.tail(30)
    );
    c
}

/// The serials of `s` that c's outbound connections to it verified, oldest first.
fn serials_seen(agent: &Agent, to: std::net::SocketAddr) -> Vec<String> {
    agent
        .access()
        .iter()
        .filter(|e| e["pod"] == "c" && e["direction"] == "outbound" && e["dst"] == to.to_string())
        .filter_map(|e| e["peer_serial"].as_str().map(String::from))
        .collect()
}

#[test]
fn an_svid_from_the_workload_api_rotates_mid_traffic_without_a_failed_connection() {
    let Some(node) = node("spiffe_workload_api", &["c", "s", "x"]) else {
        return;
    };
    let (c, s, x) = (node.pod("c"), node.pod("s"), node.pod("x"));
    let ca = DevCa::new(&node.tmp().join("ca"));
    let id = format!("{TD}/s");
    let issue = |dir: &str| ca.issue(&id, &node.tmp().join(dir), false);
    let (v1, v2, v3) = (issue("s-v1"), issue("s-v2"), issue("s-v3"));
    let cs = ca.issue(&format!("{TD}/c"), &node.tmp().join("c"), false);
    let socket = node.tmp().join("spire-agent.sock");
    let spire = FakeSpire::start(&socket);
    spire.publish(&[(&id, &v1)]);

    let policy = node.tmp().join("s-policy.yaml");
    std::fs::write(&policy, "default: authenticated\n").unwrap();
    let mut table = toml::Table::new();
    table.insert("mode".into(), "strict".into());
    table.insert("policy".into(), policy.display().to_string().into());
    table.insert("spiffe_socket".into(), spire.endpoint().into());
    let cfg = AgentConfig::new(&node)
        .mesh()
        .pod_extra(c, "closed", &cs.toml())
        .pod_table(s, "closed", table);
    let mut agent = Agent::start(&cfg);
    let _srv = s.serve(&[8080]);
    let to = at(s, false, 8080);
    let first = cert_of(&agent, "s");
    assert_eq!(first["serial"], v1.serial(), "{first}");
    assert_eq!(first["from"], spire.endpoint());
    assert_eq!(first["spiffe_id"], id);

    // 300 mutual TLS connections, 3 at a time; the SVID rotates when a third are done.
    let load = c.client_spawn(to, &["--count", "300", "--concurrency", "3"]);
    let going = settle(
        Duration::from_secs(30),
        || serials_seen(&agent, to).len(),
        |n| *n >= 100,
    );
    assert!(going >= 100, "the load did not get going");
    spire.publish(&[(&id, &v2)]);
    let rotated = wait_serial(&agent, &v2.serial());
    assert_eq!(rotated["rotations"], 1, "{rotated}");
    let load = client_result(load);
    assert_eq!(
        (load.ok, load.failed),
        (300, 0),
        "connections failed across the rotation: {:?}",
        load.errors
    );
    // Every connection's record is written when it closes, a moment after the client saw
    // it end.
    let seen = settle(WAIT, || serials_seen(&agent, to), |s| s.len() >= 300);
    assert_eq!(seen.len(), 300, "records of the load");
    assert!(
        seen.contains(&v1.serial()) && seen.contains(&v2.serial()),
        "{seen:?}"
    );
    // Every handshake after the rotation presents the new SVID.
    let before = seen.len();
    assert_eq!(c.client(to, &["--count", "5"]).ok, 5);
    let all = settle(WAIT, || serials_seen(&agent, to), |s| s.len() >= before + 5);
    let after = &all[before..];
    assert_eq!(
        after,
        vec![v2.serial(); 5],
        "new handshakes after the rotation"
    );

    // A broken update (v3's certificate with v1's key) is rejected: v2 keeps serving.
    let mut broken = simnode::spire::pb::X509svid {
        spiffe_id: id.clone(),
        x509_svid: simnode::spire::der(&v3.cert()),
        x509_svid_key: simnode::spire::der(&v1.key()),
        bundle: simnode::spire::der(&v3.bundle()),
        hint: String::new(),
    };
    spire.publish_raw(simnode::spire::pb::X509svidResponse {
        svids: vec![broken.clone()],
        ..Default::default()
    });
    agent.wait_for(
        "the broken update's rejection",
        |e| {
            e["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("identity reload rejected"))
        },
        WAIT,
    );
    assert_eq!(cert_of(&agent, "s")["serial"], v2.serial());
    assert_eq!(cert_of(&agent, "s")["rejected"], 1);
    assert_eq!(
        c.client(to, &[]).ok,
        1,
        "the last good SVID stopped serving"
    );

    // The SPIRE agent restarts: the stream ends, the agent reconnects and takes v3.
    let opened = spire.streams_opened();
    assert_eq!(opened, 1);
    drop(spire);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(c.client(to, &[]).ok, 1, "SPIRE's absence broke serving");
    let spire = FakeSpire::start(&socket);
    broken.x509_svid_key = simnode::spire::der(&v3.key());
    spire.publish_raw(simnode::spire::pb::X509svidResponse {
        svids: vec![broken],
        ..Default::default()
    });
    wait_serial(&agent, &v3.serial());
    assert_eq!(spire.streams_opened(), 1);
    assert_eq!(c.client(to, &[]).ok, 1);

    // Nothing behind the socket: the enrolment fails and names what to check.
    let missing = node.tmp().join("no-spire.sock");
    let out = agent.enroll(
        &Enrol::pod(x)
            .arg("--mode", "strict")
            .arg("--spiffe-socket", format!("unix://{}", missing.display())),
    );
    assert_ne!(out.code, Some(0), "{out:?}");
    assert!(
        out.stderr.contains("is the SPIRE agent running"),
        "{}",
        out.stderr
    );
    println!(
        "rotated mid-traffic: {} then {} over 300 connections, 0 failed; broken update rejected; reconnected after a restart",
        v1.serial(),
        v2.serial()
    );
    assert!(agent.stop().success());
}
