//! Certificates for tests: the agent's own development CA (`agent ca ...`) and, for
//! interoperability, the same made with the openssl command line.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use crate::{agent::workspace_bin, sys::run};

/// A pod's identity files, in the layout `agent ca issue` writes.
#[derive(Debug, Clone)]
pub struct Svid {
    pub dir: PathBuf,
}

impl Svid {
    pub fn cert(&self) -> PathBuf {
        self.dir.join("cert.pem")
    }
    pub fn key(&self) -> PathBuf {
        self.dir.join("key.pem")
    }
    pub fn bundle(&self) -> PathBuf {
        self.dir.join("bundle.pem")
    }

    /// The `[[pod]]` lines that give a pod this identity.
    pub fn toml(&self) -> String {
        format!(
            "cert = \"{}\"\nkey = \"{}\"\nbundle = \"{}\"\n",
            self.cert().display(),
            self.key().display(),
            self.bundle().display()
        )
    }

    /// The `[[pod]]` lines of a STRICT pod with this identity and the policy at `policy`.
    pub fn toml_strict(&self, policy: &Path) -> String {
        format!(
            "mode = \"strict\"\npolicy = \"{}\"\n{}",
            policy.display(),
            self.toml()
        )
    }

    /// The certificate's serial number, as openssl prints it (upper-case hex).
    pub fn serial(&self) -> String {
        let out = run(
            "openssl",
            &[
                "x509",
                "-noout",
                "-serial",
                "-in",
                &self.cert().to_string_lossy(),
            ],
        );
        out.trim().trim_start_matches("serial=").to_string()
    }
}

/// A CA made by `agent ca init`.
pub struct DevCa {
    pub dir: PathBuf,
}

impl DevCa {
    pub fn new(dir: &Path) -> DevCa {
        Self::named(dir, "td.test")
    }

    /// A CA with its own name (two CAs with one name would chain to each other by name
    /// and fail on the signature instead of on the issuer).
    pub fn named(dir: &Path, name: &str) -> DevCa {
        let d = dir.to_string_lossy();
        agent(&["ca", "init", "--dir", &d, "--trust-domain", name]);
        DevCa {
            dir: dir.to_path_buf(),
        }
    }

    /// Issues an SVID into `out` (overwriting what is there: that is a rotation).
    pub fn issue(&self, spiffe_id: &str, out: &Path, expired: bool) -> Svid {
        let (ca, o) = (self.dir.to_string_lossy(), out.to_string_lossy());
        let mut args = vec![
            "ca",
            "issue",
            "--dir",
            &ca,
            "--spiffe-id",
            spiffe_id,
            "--out",
            &o,
        ];
        if expired {
            args.push("--expired");
        }
        agent(&args);
        Svid {
            dir: out.to_path_buf(),
        }
    }

    pub fn pem(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
}

fn agent(args: &[&str]) {
    let out = Command::new(workspace_bin("agent"))
        .args(args)
        .output()
        .expect("run agent ca");
    assert!(
        out.status.success(),
        "agent {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA and SVIDs made entirely by the openssl command line (no agent code involved).
pub struct OpensslCa {
    dir: PathBuf,
}

impl OpensslCa {
    pub fn new(dir: &Path) -> OpensslCa {
        Self::named(dir, "openssl test CA")
    }

    /// A CA with its own name (CAs sharing one would chain to each other by name).
    pub fn named(dir: &Path, name: &str) -> OpensslCa {
        std::fs::create_dir_all(dir).unwrap();
        let d = |f: &str| dir.join(f).to_string_lossy().into_owned();
        run(
            "openssl",
            &[
                "ecparam",
                "-name",
                "prime256v1",
                "-genkey",
                "-noout",
                "-out",
                &d("ca.key"),
            ],
        );
        run(
            "openssl",
            &[
                "req",
                "-x509",
                "-new",
                "-key",
                &d("ca.key"),
                "-sha256",
                "-days",
                "2",
                "-subj",
                &format!("/O=openssl-test/CN={name}"),
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
                "-out",
                &d("ca.pem"),
            ],
        );
        OpensslCa {
            dir: dir.to_path_buf(),
        }
    }

    pub fn issue(&self, spiffe_id: &str, name: &str) -> Svid {
        let out = self.sign(
            name,
            "/O=openssl-test",
            "serverAuth,clientAuth",
            &format!("critical,URI:{spiffe_id}"),
        );
        std::fs::copy(self.dir.join("ca.pem"), out.join("bundle.pem")).unwrap();
        Svid { dir: out }
    }

    /// A web certificate (an edge listener's, or a client's): `subject` as openssl's
    /// `-subj` takes it, `san` as `subjectAltName` does (`DNS:a.example,IP:10.0.0.1`).
    pub fn issue_web(&self, name: &str, subject: &str, san: &str, client: bool) -> WebCert {
        let eku = if client { "clientAuth" } else { "serverAuth" };
        let dir = self.sign(name, subject, eku, san);
        WebCert { dir }
    }

    /// The CA certificate, as clients trust it.
    pub fn pem(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// A key and a certificate signed by this CA in `dir/name` (`key.pem`, `cert.pem`).
    fn sign(&self, name: &str, subject: &str, eku: &str, san: &str) -> PathBuf {
        let out = self.dir.join(name);
        std::fs::create_dir_all(&out).unwrap();
        let o = |f: &str| out.join(f).to_string_lossy().into_owned();
        let d = |f: &str| self.dir.join(f).to_string_lossy().into_owned();
        let ext = o("ext.cnf");
        std::fs::write(
            &ext,
            format!(
                "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n\
                 extendedKeyUsage={eku}\nsubjectAltName={san}\n"
            ),
        )
        .unwrap();
        run(
            "openssl",
            &[
                "ecparam",
                "-name",
                "prime256v1",
                "-genkey",
                "-noout",
                "-out",
                &o("key.ec"),
            ],
        );
        // PKCS#8, as most tools write it today.
        run(
            "openssl",
            &[
                "pkcs8",
                "-topk8",
                "-nocrypt",
                "-in",
                &o("key.ec"),
                "-out",
                &o("key.pem"),
            ],
        );
        run(
            "openssl",
            &[
                "req",
                "-new",
                "-key",
                &o("key.pem"),
                "-subj",
                subject,
                "-out",
                &o("req.csr"),
            ],
        );
        run(
            "openssl",
            &[
                "x509",
                "-req",
                "-in",
                &o("req.csr"),
                "-CA",
                &d("ca.pem"),
                "-CAkey",
                &d("ca.key"),
                "-CAcreateserial",
                "-days",
                "1",
                "-sha256",
                "-extfile",
                &ext,
                "-out",
                &o("cert.pem"),
            ],
        );
        out
    }
}

/// A certificate and key made by [`OpensslCa::issue_web`].
#[derive(Debug, Clone)]
pub struct WebCert {
    pub dir: PathBuf,
}

impl WebCert {
    pub fn cert(&self) -> PathBuf {
        self.dir.join("cert.pem")
    }
    pub fn key(&self) -> PathBuf {
        self.dir.join("key.pem")
    }

    /// The certificate's serial number, as openssl prints it.
    pub fn serial(&self) -> String {
        let cert = self.cert();
        let out = run(
            "openssl",
            &["x509", "-noout", "-serial", "-in", &cert.to_string_lossy()],
        );
        out.trim().trim_start_matches("serial=").to_string()
    }
}
