//! Edge TLS on a simulated node, with real clients from outside the mesh (curl and
//! `openssl s_client` on the node): the agent terminates TLS 1.2 and 1.3 on a pod's edge
//! ports with ALPN h2 and http/1.1, requires and verifies client certificates against a CA
//! that is not the mesh's, refuses or redirects plaintext, sets `x-forwarded-client-cert`
//! from what the handshake verified (a forged one never reaches the app), reloads its
//! certificate, and still speaks mutual TLS to mesh agents on the same port.

mod common;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
};

use common::*;
use serde_json::Value;
use simnode::{
    pki::{DevCa, OpensslCa, Svid, WebCert},
    time::scaled,
    Agent, AgentConfig, Node,
};

const TD: &str = "spiffe://td.test/ns/default/sa";
const HOST: &str = "b.example.test";
const XFCC: &str = "x-forwarded-client-cert";
const FORGED: &str =
    "x-forwarded-client-cert: By=spiffe://evil;URI=spiffe://td.test/ns/default/sa/admin";

/// Pod `b`'s certificates: its SVID from the mesh CA, and a web CA (not the mesh's) that
/// signs the edge certificates clients see for `b.example.test`.
struct Certs {
    mesh: DevCa,
    svid_b: Svid,
    web: OpensslCa,
}

impl Certs {
    fn new(node: &Node) -> Self {
        let mesh = DevCa::new(&node.tmp().join("mesh-ca"));
        let svid_b = mesh.issue(&format!("{TD}/b"), &node.tmp().join("b"), false);
        let web = OpensslCa::new(&node.tmp().join("web-ca"));
        Self { mesh, svid_b, web }
    }

    /// An edge certificate for `b.example.test`, named `name` in the web CA's directory.
    fn edge_cert(&self, name: &str) -> WebCert {
        self.web.issue_web(
            name,
            "/O=Example/CN=b.example.test",
            &format!("DNS:{HOST}"),
            false,
        )
    }
}

fn write_policy(node: &Node, yaml: &str) -> PathBuf {
    let path = node.tmp().join("b-policy.yaml");
    std::fs::write(&path, yaml).unwrap();
    path
}

/// One `[[pod.edge]]` table.
fn edge_table(
    ports: &[u16],
    cert: &WebCert,
    client_ca: Option<&Path>,
    redirect: bool,
) -> toml::Value {
    let mut t = toml::Table::new();
    let ports: Vec<toml::Value> = ports.iter().map(|p| i64::from(*p).into()).collect();
    t.insert("ports".into(), ports.into());
    t.insert("cert".into(), cert.cert().display().to_string().into());
    t.insert("key".into(), cert.key().display().to_string().into());
    if let Some(ca) = client_ca {
        t.insert("client_ca".into(), ca.display().to_string().into());
    }
    t.insert("redirect_http".into(), redirect.into());
    toml::Value::Table(t)
}

/// Pod `b`'s table: STRICT with its SVID and policy, and these edge listeners.
fn pod_b(svid: &Svid, policy: &Path, edge: Vec<toml::Value>) -> toml::Table {
    let mut t: toml::Table = toml::from_str(&svid.toml_strict(policy)).unwrap();
    t.insert("edge".into(), toml::Value::Array(edge));
    t
}

/// What curl got: the status (0 when no response came), the HTTP version, the body, the
/// redirect target, and curl's exit code.
#[derive(Debug)]
struct Curl {
    status: u16,
    version: String,
    body: String,
    location: String,
    exit: i32,
    #[allow(dead_code, reason = "read through Debug in assertion messages")]
    stderr: String,
}

/// curl from the node to `b` at `ip:port`, named `b.example.test`, trusting `ca`.
fn curl(
    ip: std::net::IpAddr,
    port: u16,
    scheme: &str,
    path: &str,
    ca: &Path,
    extra: &[&str],
) -> Curl {
    let resolve = format!("{HOST}:{port}:{}", SocketAddr::new(ip, port).ip());
    let url = format!("{scheme}://{HOST}:{port}{path}");
    let out = Command::new("curl")
        .args(["-sS", "--max-time"])
        .arg(
            scaled(std::time::Duration::from_secs(10))
                .as_secs()
                .to_string(),
        )
        .args(["--resolve", &resolve, "--cacert"])
        .arg(ca)
        .args(["-w", "\n%{http_code} %{http_version} %{redirect_url}"])
        .args(extra)
        .arg(&url)
        .output()
        .expect("run curl");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, last) = stdout.rsplit_once('\n').unwrap_or(("", stdout.as_str()));
    let mut fields = last.split(' ');
    Curl {
        status: fields.next().and_then(|s| s.parse().ok()).unwrap_or(0),
        version: fields.next().unwrap_or("").to_string(),
        location: fields.next().unwrap_or("").to_string(),
        body: body.to_string(),
        exit: out.status.code().unwrap_or(-1),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `openssl s_client` to `addr` with `args`; returns what it printed (both streams).
fn s_client(addr: SocketAddr, args: &[&str]) -> String {
    let out = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &addr.to_string(),
            "-servername",
            HOST,
        ])
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run openssl s_client");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The serial of the certificate the server at `addr` presents.
fn served_serial(addr: SocketAddr, ca: &Path) -> String {
    let text = s_client(addr, &["-CAfile", &ca.display().to_string(), "-showcerts"]);
    let pem_start = text
        .find("-----BEGIN CERTIFICATE-----")
        .unwrap_or_else(|| panic!("no certificate from {addr}: {text}"));
    let pem_end = text[pem_start..].find("-----END CERTIFICATE-----").unwrap() + pem_start + 25;
    let mut x509 = Command::new("openssl")
        .args(["x509", "-noout", "-serial"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    x509.stdin
        .take()
        .unwrap()
        .write_all(&text.as_bytes()[pem_start..pem_end])
        .unwrap();
    let out = x509.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .trim_start_matches("serial=")
        .to_string()
}

fn edge_record(agent: &Agent, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    agent.wait_for(
        what,
        |e| e["target"] == "access" && e["tls"] == "edge_tls" && pred(e),
        WAIT,
    )
}

const EDGE_POLICY: &str = r#"
default: deny
rules:
  - name: mesh-a
    action: allow
    from: { identities: ["spiffe://td.test/ns/default/sa/a"] }
    http: { paths: ["/*"] }
  - name: public
    action: allow
    from: { unauthenticated: true }
    http: { paths: ["/public*"] }
"#;

#[test]
fn edge_tls_serves_clients_outside_the_mesh_and_mesh_agents_on_the_same_port() {
    let Some(node) = node("edge_tls", &["a", "b"]) else {
        return;
    };
    let (a, b) = (node.pod("a"), node.pod("b"));
    let certs = Certs::new(&node);
    let (sb, web) = (&certs.svid_b, &certs.web);
    let sa = certs
        .mesh
        .issue(&format!("{TD}/a"), &node.tmp().join("a"), false);
    let server = certs.edge_cert("b-edge");
    let srv = b.serve_http(&[8443]);
    let policy = write_policy(&node, EDGE_POLICY);
    let cfg = AgentConfig::new(&node)
        .mesh()
        .pod_extra(a, "open", &sa.toml())
        .pod_table(
            b,
            "open",
            pod_b(sb, &policy, vec![edge_table(&[8443], &server, None, false)]),
        );
    let mut agent = Agent::start(&cfg);

    // HTTP/1.1 and HTTP/2 from curl, over IPv4 and IPv6, each with a forged XFCC. The
    // requests that reach the app are counted here: its report can trail the response.
    let mut reached = 0;
    for (flag, version, app_version) in [
        ("--http1.1", "1.1", "HTTP/1.1"),
        ("--http2", "2", "HTTP/2.0"),
    ] {
        for v6 in [false, true] {
            let r = curl(
                b.ip(v6),
                8443,
                "https",
                "/public/x",
                &web.pem(),
                &[flag, "-H", FORGED],
            );
            assert_eq!(
                (r.status, r.version.as_str()),
                (200, version),
                "{flag} v6={v6}: {r:?}"
            );
            assert_eq!(r.body, "hello GET /public/x\n");
            reached += 1;
            let seen = &srv.wait_http(reached)[reached - 1..];
            assert_eq!(seen.len(), 1, "{seen:?}");
            assert_eq!(seen[0].version, app_version);
            assert_eq!(
                seen[0].headers.get(XFCC),
                None,
                "no client certificate, so no XFCC; the forged one must be stripped"
            );
        }
    }
    let rec = edge_record(&agent, "an h2 edge connection", |e| e["alpn"] == "h2");
    assert_eq!(rec["detected"], "tls");
    edge_record(&agent, "an http/1.1 edge connection", |e| {
        e["alpn"] == "http/1.1"
    });

    // The pod's policy decides each request: nothing allows /private to an outsider.
    let denied = curl(b.ip(false), 8443, "https", "/private", &web.pem(), &[]);
    assert_eq!(denied.status, 403, "{denied:?}");
    assert!(denied.body.contains("default deny"), "{denied:?}");

    // TLS 1.2 too, and ALPN as openssl sees it; the chain verifies against the web CA.
    let tls12 = curl(
        b.ip(false),
        8443,
        "https",
        "/public",
        &web.pem(),
        &["--tlsv1.2", "--tls-max", "1.2"],
    );
    assert_eq!(tls12.status, 200, "{tls12:?}");
    reached += 1;
    let ca = web.pem().display().to_string();
    let hello = s_client(
        at(b, false, 8443),
        &[
            "-alpn",
            "h2,http/1.1",
            "-CAfile",
            &ca,
            "-verify_return_error",
        ],
    );
    assert!(hello.contains("ALPN protocol: h2"), "{hello}");
    assert!(hello.contains("Verify return code: 0 (ok)"), "{hello}");
    assert!(hello.contains("TLSv1.3"), "{hello}");
    let hello12 = s_client(
        at(b, false, 8443),
        &["-tls1_2", "-alpn", "http/1.1", "-CAfile", &ca],
    );
    assert!(
        hello12.contains("ALPN protocol: http/1.1") && hello12.contains("TLSv1.2"),
        "{hello12}"
    );

    // A mesh agent on the same port still gets mutual TLS; the app learns who called from
    // the XFCC the agent set, not from the one the client sent.
    for h2 in [false, true] {
        let r = a.http_client_with(at(b, false, 8443), "GET /private", h2, &[FORGED]);
        assert_eq!(
            (r.error.as_deref(), r.statuses.as_slice()),
            (None, &[200][..]),
            "h2={h2}"
        );
        reached += 1;
        let seen = &srv.wait_http(reached)[reached - 1..];
        let xfcc = seen[0].headers.get(XFCC).cloned().unwrap_or_default();
        assert!(
            xfcc.starts_with(&format!("By={TD}/b;Hash=")) && xfcc.ends_with(&format!("URI={TD}/a")),
            "h2={h2}: {xfcc}"
        );
        assert!(
            !xfcc.contains("evil") && !xfcc.contains("admin"),
            "forged XFCC kept: {xfcc}"
        );
    }
    // Everything the app saw, in order: the denied /private from outside is not there.
    let paths: Vec<String> = srv
        .wait_http(reached)
        .iter()
        .map(|r| r.path.clone())
        .collect();
    assert_eq!(
        paths,
        [
            "/public/x",
            "/public/x",
            "/public/x",
            "/public/x",
            "/public",
            "/private",
            "/private"
        ]
    );
    agent.wait_for(
        "the mesh connection to the edge port",
        |e| {
            e["target"] == "access"
                && e["tls"] == "mtls"
                && e["dst"] == at(b, false, 8443).to_string()
        },
        WAIT,
    );
    assert!(agent.stop().success());
}

const CLIENT_CERT_POLICY: &str = r#"
default: deny
rules:
  - name: alice-private
    action: allow
    from: { client_cert: { sans: ["alice.example.test"] } }
    http: { paths: ["/private*"] }
  - name: public
    action: allow
    from: { unauthenticated: true }
    http: { paths: ["/public*"] }
"#;

#[test]
fn edge_client_certificates_are_required_and_verified_against_their_own_ca() {
    let Some(node) = node("edge_mtls", &["b"]) else {
        return;
    };
    let b = node.pod("b");
    let certs = Certs::new(&node);
    let (sb, web) = (&certs.svid_b, &certs.web);
    let server = certs.edge_cert("b-edge");
    let clients = OpensslCa::named(&node.tmp().join("client-ca"), "partner client CA");
    let alice = clients.issue_web(
        "alice",
        "/O=Partner/CN=alice",
        "DNS:alice.example.test",
        true,
    );
    let bob = clients.issue_web("bob", "/O=Partner/CN=bob", "DNS:bob.example.test", true);
    // Signed by a CA the listener does not trust (the web server's own).
    let mallory = web.issue_web(
        "mallory",
        "/O=Partner/CN=alice",
        "DNS:alice.example.test",
        true,
    );
    let srv = b.serve_http(&[8443]);
    let policy = write_policy(&node, CLIENT_CERT_POLICY);
    let edge = edge_table(&[8443], &server, Some(&clients.pem()), false);
    let cfg = AgentConfig::new(&node).pod_table(b, "open", pod_b(sb, &policy, vec![edge]));
    let mut agent = Agent::start(&cfg);
    let with = |cert: &WebCert, path: &str| {
        let (c, k) = (
            cert.cert().display().to_string(),
            cert.key().display().to_string(),
        );
        curl(
            b.ip(false),
            8443,
            "https",
            path,
            &web.pem(),
            &["--cert", &c, "--key", &k, "-H", FORGED],
        )
    };

    let r = with(&alice, "/private/report");
    assert_eq!(r.status, 200, "{r:?}");
    let seen = &srv.wait_http(1);
    let xfcc = seen[0].headers.get(XFCC).cloned().unwrap_or_default();
    assert!(xfcc.starts_with(&format!("By={TD}/b;Hash=")), "{xfcc}");
    assert!(
        xfcc.contains("CN=alice") && xfcc.ends_with(";DNS=alice.example.test"),
        "{xfcc}"
    );
    assert!(!xfcc.contains("evil"), "forged XFCC kept: {xfcc}");
    let rec = edge_record(&agent, "alice's connection", |e| {
        e["client_cert"]
            .as_str()
            .is_some_and(|s| s.contains("CN=alice"))
    });
    assert_eq!(rec["http_denied"], 0, "{rec}");

    // bob is a verified client too, but the rule names alice.
    let r = with(&bob, "/private/report");
    assert_eq!(r.status, 403, "{r:?}");
    assert!(r.body.contains("default deny"), "{r:?}");
    assert_eq!(with(&bob, "/public").status, 200);

    // A certificate from another CA, and none at all: no handshake, no request.
    let r = with(&mallory, "/public");
    assert_eq!(
        r.status, 0,
        "an untrusted client certificate was accepted: {r:?}"
    );
    let r = curl(b.ip(false), 8443, "https", "/public", &web.pem(), &[]);
    assert_eq!(
        r.status, 0,
        "a client without a certificate was served: {r:?}"
    );
    let seen = srv.wait_http(2);
    assert_eq!(
        seen.len(),
        2,
        "only alice's and bob's allowed requests: {seen:?}"
    );
    for reason in ["untrusted_ca", "no_client_cert"] {
        let rec = agent.wait_for(
            reason,
            |e| {
                e["target"] == "access"
                    && e["outcome"] == "tls_handshake_failed"
                    && e["reason"] == reason
            },
            WAIT,
        );
        assert_eq!(rec["detected"], "tls", "{rec}");
    }
    assert!(agent.stop().success());
}

#[test]
fn plaintext_http_on_an_edge_port_is_redirected_or_refused() {
    let Some(node) = node("edge_plain", &["b"]) else {
        return;
    };
    let b = node.pod("b");
    let certs = Certs::new(&node);
    let (sb, web) = (&certs.svid_b, &certs.web);
    let server = certs.edge_cert("b-edge");
    let srv = b.serve_http(&[8443, 9443]);
    let policy = write_policy(&node, EDGE_POLICY);
    let edge = vec![
        edge_table(&[8443], &server, None, true),
        edge_table(&[9443], &server, None, false),
    ];
    let cfg = AgentConfig::new(&node).pod_table(b, "open", pod_b(sb, &policy, edge));
    let mut agent = Agent::start(&cfg);

    for v6 in [false, true] {
        let r = curl(b.ip(v6), 8443, "http", "/public/x?page=2", &web.pem(), &[]);
        assert_eq!(r.status, 308, "v6={v6}: {r:?}");
        assert_eq!(
            r.location,
            format!("https://{HOST}:8443/public/x?page=2"),
            "{r:?}"
        );
        // Following it lands on the same port, in TLS.
        let followed = curl(b.ip(v6), 8443, "http", "/public/x", &web.pem(), &["-L"]);
        assert_eq!(followed.status, 200, "{followed:?}");
    }
    let seen = srv.wait_http(2).len();
    assert_eq!(seen, 2, "only the followed redirects reach the app");
    let refused = curl(b.ip(false), 9443, "http", "/public", &web.pem(), &[]);
    assert_eq!(
        refused.status, 0,
        "plaintext served on an edge port: {refused:?}"
    );
    assert_ne!(refused.exit, 0, "{refused:?}");
    assert_eq!(
        srv.seen_http().len(),
        seen,
        "the app saw plaintext on an edge port"
    );
    let rec = agent.wait_for(
        "the refused plaintext connection",
        |e| e["target"] == "access" && e["reason"] == "plaintext_on_edge_port",
        WAIT,
    );
    assert_eq!(rec["dst"], at(b, false, 9443).to_string());
    // TLS on the same port still works.
    assert_eq!(
        curl(b.ip(false), 9443, "https", "/public", &web.pem(), &[]).status,
        200
    );
    assert!(agent.stop().success());
}

#[test]
fn the_edge_certificate_reloads_and_a_bad_one_is_rejected() {
    let Some(node) = node("edge_reload", &["b"]) else {
        return;
    };
    let b = node.pod("b");
    let certs = Certs::new(&node);
    let (sb, web) = (&certs.svid_b, &certs.web);
    let first = certs.edge_cert("first");
    let second = certs.edge_cert("second");
    // cert-manager's Secret layout, given as `dir`.
    let secret = node.tmp().join("b-tls");
    std::fs::create_dir_all(&secret).unwrap();
    let publish = |cert: &WebCert| {
        // Written aside and renamed in, as a Secret update replaces files.
        for (from, to) in [(cert.key(), "tls.key"), (cert.cert(), "tls.crt")] {
            let tmp = secret.join(format!(".{to}.tmp"));
            std::fs::copy(from, &tmp).unwrap();
            std::fs::rename(&tmp, secret.join(to)).unwrap();
        }
    };
    publish(&first);
    let srv = b.serve_http(&[8443]);
    let policy = write_policy(&node, EDGE_POLICY);
    let mut edge = toml::Table::new();
    edge.insert("ports".into(), vec![toml::Value::from(8443)].into());
    edge.insert("dir".into(), secret.display().to_string().into());
    let cfg = AgentConfig::new(&node).pod_table(b, "open", pod_b(sb, &policy, vec![edge.into()]));
    let mut agent = Agent::start(&cfg);
    let addr = at(b, false, 8443);
    assert_eq!(served_serial(addr, &web.pem()), first.serial());

    publish(&second);
    agent.wait_for(
        "the rotation",
        |e| {
            e["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("edge certificate rotated"))
        },
        WAIT,
    );
    assert_eq!(served_serial(addr, &web.pem()), second.serial());

    std::fs::write(secret.join("tls.crt"), "not a certificate\n").unwrap();
    let rejected = agent.wait_for(
        "the rejected reload",
        |e| {
            e["message"]
                == "edge certificate reload rejected; the previous certificate keeps serving"
                && e["error"]
                    .as_str()
                    .is_some_and(|m| m.contains("no CERTIFICATE block"))
        },
        WAIT,
    );
    assert!(
        rejected["error"]
            .as_str()
            .is_some_and(|e| e.contains("tls.crt")),
        "{rejected}"
    );
    assert_eq!(
        served_serial(addr, &web.pem()),
        second.serial(),
        "a bad file replaced the certificate"
    );
    let r = curl(b.ip(false), 8443, "https", "/public", &web.pem(), &[]);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(srv.wait_http(1).len(), 1);
    let pods = agent.pods();
    assert_eq!(pods[0]["edge"][0]["serial"], second.serial(), "{}", pods[0]);
    assert!(agent.stop().success());
}
