//! Entry points for the `fuzz/` crate (feature `fuzzing`): each takes arbitrary bytes and
//! drives the agent's own parsing and decision code with them, exactly as the daemon does.
//! A panic, a hang or a runaway allocation here is a bug in that code.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::OnceLock,
    time::Duration,
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{body::Incoming, Request, Response};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{
    authz::{Caller, Policy, PolicyFile},
    config::{Config, FileConfig, RunArgs},
    identity::IdentityFiles,
    spec::{PodDefaults, PodRequest, Probe},
    types::{ClientAddr, OrigDstAddr},
};

/// A filesystem where everything exists and is what it claims to be, so validation runs
/// all its checks on the fuzzer's values instead of stopping at the first missing file.
struct Anything;

impl Probe for Anything {
    fn netns(&self, _: &Path) -> Result<(), String> {
        Ok(())
    }
    fn cgroup(&self, _: &Path) -> Result<(), String> {
        Ok(())
    }
    fn identity_dir(&self, dir: &Path) -> Result<IdentityFiles, String> {
        Ok(IdentityFiles {
            cert: dir.join("tls.crt"),
            key: dir.join("tls.key"),
            bundle: dir.join("ca.crt"),
        })
    }
    fn cgroup2_root(&self) -> Result<PathBuf, String> {
        Ok("/sys/fs/cgroup".into())
    }
    fn own_cgroup(&self) -> Result<PathBuf, String> {
        Ok("/sys/fs/cgroup/agent".into())
    }
}

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("a literal socket address")
}

/// Decides a few connections and requests with `policy`, from both kinds of caller.
fn exercise(policy: &Policy) {
    let id = crate::identity::SpiffeId::parse("spiffe://td.test/ns/default/sa/web").ok();
    for peer in [None, id.as_ref()] {
        for (client, dst) in [
            ("10.0.0.1:40000", "10.0.0.2:8080"),
            ("[fd00::1]:40000", "[fd00::2]:443"),
        ] {
            let caller = Caller {
                peer,
                client: ClientAddr::new(addr(client)),
                client_cert: None,
            };
            let dst = OrigDstAddr::new(addr(dst));
            let _ = policy.authorize(caller, dst, "td.test");
            let _ = policy.authorize_egress(dst, None);
            let req = Request::builder()
                .method("GET")
                .uri("/admin/x?y=1")
                .header("x-user", "a")
                .body(())
                .expect("a literal request");
            let _ = crate::proxy::http::decide(policy, caller, dst, &req, None, "td.test");
        }
    }
}

/// A policy file: parsed, compiled and used to decide.
pub fn policy(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(file) = PolicyFile::parse("fuzz.yaml", text) {
        exercise(&Policy::compile("fuzz.yaml", file));
    }
}

/// The agent's config file: parsed and validated.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(file) = FileConfig::parse(Path::new("fuzz.toml"), text) {
        let _ = Config::build(file, &RunArgs::default(), &Anything);
    }
}

/// The first bytes of an inbound connection: TLS (the agent's or another) or plaintext.
pub fn detect(data: &[u8]) {
    for more in [false, true] {
        let _ = crate::proxy::inbound::classify(data, more);
    }
}

/// Admin API request bodies: an enrolment request (parsed and validated) and a CNI request.
pub fn admin(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    if let Ok(req) = crate::admin::parse_json::<PodRequest>("a pod request", &text) {
        let _ = req.validate("", &PodDefaults::default(), &Anything);
    }
    let _ = crate::admin::parse_json::<crate::cni::CniRequest>("a CNI request", &text);
}

/// The policy the HTTP target decides with: an HTTP rule, so every request is inspected.
fn http_policy() -> &'static Policy {
    static POLICY: OnceLock<Policy> = OnceLock::new();
    POLICY.get_or_init(|| {
        let yaml = "default: deny\nrules:\n  - name: public\n    action: allow\n    from: { unauthenticated: true }\n    http: { methods: [GET], paths: [\"/public/*\"], headers: { x-user: a } }\n";
        Policy::compile("fuzz", PolicyFile::parse("fuzz", yaml).expect("the fuzz policy"))
    })
}

/// Bytes from a client on an inspected connection: the same HTTP server (HTTP/1 and
/// HTTP/2, with the agent's header limits) and the same per-request decision.
pub fn http(data: &[u8]) {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    let rt = RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime")
    });
    let settings = crate::proxy::Settings {
        connect_timeout: Duration::from_secs(1),
        handshake_timeout: Duration::from_secs(1),
        detect_timeout: Duration::from_secs(1),
        http_header_timeout: Duration::from_millis(200),
        http_max_header_bytes: 16 * 1024,
        mesh_networks: Vec::new(),
        known: Default::default(),
        limits: Default::default(),
        idle_timeout: Duration::from_secs(1),
    };
    let data = data.to_vec();
    rt.block_on(async move {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let service = hyper::service::service_fn(|req: Request<Incoming>| async move {
            let caller = Caller {
                peer: None,
                client: ClientAddr::new(addr("10.0.0.1:40000")),
                client_cert: None,
            };
            let dst = OrigDstAddr::new(addr("10.0.0.2:8080"));
            let status =
                match crate::proxy::http::decide(http_policy(), caller, dst, &req, None, "td") {
                    Ok(_) => 200,
                    Err(_) => 403,
                };
            let mut resp = Response::new(Full::new(Bytes::from_static(b"ok")));
            *resp.status_mut() = hyper::StatusCode::from_u16(status).expect("a status");
            Ok::<_, std::convert::Infallible>(resp)
        });
        let builder = crate::proxy::http::server(&settings);
        let serve = builder.serve_connection(TokioIo::new(server), service);
        let talk = async move {
            let _ = client.write_all(&data).await;
            let _ = client.shutdown().await;
            let mut sink = Vec::new();
            let _ = client.read_to_end(&mut sink).await;
        };
        // Bounded: a connection the server keeps open past its timeouts is a finding too,
        // but not one that should stall the fuzzer.
        let _ =
            tokio::time::timeout(Duration::from_secs(2), async { tokio::join!(serve, talk) }).await;
    });
}
