//! A test Key Broker Service speaking trustee's RCAR protocol 0.4.0 (not a product).
//!
//! It verifies `sample` evidence (report-data binding, nonce, session expiry), digests the
//! request's initdata as trustee does (and compares it with a reference digest when one is set,
//! as an attestation policy on the `init_data` claim would), applies a
//! [`ResourcePolicy`], serves resources from `DIR/<repo>/<type>/<tag>`, encrypts them to the
//! TEE key with `kbs_client::jwe` (one implementation of the wire format), answers with the
//! reference's error bodies and status codes, issues ES256 tokens with a header `jwk`, and accepts
//! unauthenticated admin uploads (`POST /kbs/v0/resource/<repo>/<type>/<tag>`,
//! `POST /kbs/v0/resource-policy` with `{"policy": base64url(policy text)}`), like trustee's
//! `InsecureAllowAll` admin mode.

mod jwt;
mod policy;
mod server;
mod tls;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub use policy::ResourcePolicy;

/// Test KBS settings.
#[derive(Debug, Clone)]
pub struct TestKbsConfig {
    /// Directory with `<repo>/<type>/<tag>` files.
    pub resources_dir: PathBuf,
    /// The resource policy.
    pub policy: ResourcePolicy,
    /// Lifetime of a `kbs-session-id` session (trustee default 5 minutes).
    pub session_ttl: Duration,
    /// Lifetime of issued tokens (`exp - iat`; trustee default 5 minutes).
    pub token_ttl: Duration,
    /// Address to listen on (default `127.0.0.1:0`).
    pub listen: SocketAddr,
    /// Negative tests only: flip one bit of every JWE tag sent.
    pub tamper_jwe_tag: bool,
    /// Serve HTTPS with this PEM certificate chain and PEM private key instead of HTTP.
    pub tls: Option<TlsIdentity>,
    /// The initdata digest (standard base64, as trustee's `init_data` claim) attestations must
    /// carry; `None` accepts any initdata, or none.
    pub init_data_reference: Option<String>,
}

/// A server certificate chain and key, both PEM.
#[derive(Debug, Clone)]
pub struct TlsIdentity {
    /// Leaf first, then intermediates.
    pub cert_chain_pem: Vec<u8>,
    /// PKCS#8, SEC1 or PKCS#1 private key.
    pub key_pem: Vec<u8>,
}

impl TestKbsConfig {
    /// Defaults (allow all, 5-minute session and token) for `resources_dir`.
    pub fn new(resources_dir: impl Into<PathBuf>) -> Self {
        Self {
            resources_dir: resources_dir.into(),
            policy: ResourcePolicy::AllowAll,
            session_ttl: Duration::from_secs(300),
            token_ttl: Duration::from_secs(300),
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            tamper_jwe_tag: false,
            tls: None,
            init_data_reference: None,
        }
    }
}

/// Request counters, so tests can assert how many handshakes a client made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KbsStats {
    /// `POST /kbs/v0/auth` requests.
    pub auth: u64,
    /// `POST /kbs/v0/attest` requests.
    pub attest: u64,
    /// Successful attestations (tokens issued).
    pub attest_ok: u64,
    /// `GET /kbs/v0/resource/...` requests.
    pub resource: u64,
    /// Resource requests answered 200.
    pub resource_ok: u64,
    /// Resource requests refused for a missing/invalid token or session.
    pub resource_unauthorized: u64,
}

#[derive(Default)]
pub(crate) struct Counters {
    auth: AtomicU64,
    attest: AtomicU64,
    attest_ok: AtomicU64,
    resource: AtomicU64,
    resource_ok: AtomicU64,
    resource_unauthorized: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> KbsStats {
        let g = |a: &AtomicU64| a.load(Ordering::SeqCst);
        KbsStats {
            auth: g(&self.auth),
            attest: g(&self.attest),
            attest_ok: g(&self.attest_ok),
            resource: g(&self.resource),
            resource_ok: g(&self.resource_ok),
            resource_unauthorized: g(&self.resource_unauthorized),
        }
    }
}

/// A running test KBS; stopped on drop.
pub struct TestKbs {
    addr: SocketAddr,
    https: bool,
    state: Arc<server::State>,
    task: tokio::task::JoinHandle<()>,
}

impl TestKbs {
    /// Binds `cfg.listen` and serves on the current tokio runtime.
    pub async fn start(cfg: TestKbsConfig) -> std::io::Result<TestKbs> {
        let listener = tokio::net::TcpListener::bind(cfg.listen).await?;
        let addr = listener.local_addr()?;
        let tls = cfg.tls.clone().map(tls::acceptor).transpose()?;
        let https = tls.is_some();
        let state = Arc::new(server::State::new(cfg));
        let app = server::router(state.clone());
        let task = match tls {
            None => tokio::spawn(async move {
                if let Err(e) = axum::serve(listener, app).await {
                    tracing::error!("test KBS stopped: {e}");
                }
            }),
            Some(acceptor) => tokio::spawn(tls::serve(listener, acceptor, app)),
        };
        Ok(TestKbs {
            addr,
            https,
            state,
            task,
        })
    }

    /// Base URL, e.g. `http://127.0.0.1:40123`.
    pub fn url(&self) -> String {
        let scheme = if self.https { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// Listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Request counters so far.
    pub fn stats(&self) -> KbsStats {
        self.state.counters.snapshot()
    }

    /// Every token issued so far (for tests that check tokens never reach logs).
    pub fn issued_tokens(&self) -> Vec<String> {
        self.state.issued.lock().expect("lock").clone()
    }

    /// Every `kbs-session-id` handed out so far (for tests that check sessions never reach logs).
    pub fn issued_sessions(&self) -> Vec<String> {
        self.state.issued_sessions.lock().expect("lock").clone()
    }

    /// Replaces the resource policy.
    pub fn set_policy(&self, policy: ResourcePolicy) {
        *self.state.policy.write().expect("lock") = policy;
    }

    /// Waits until the server task ends (for the `test-kbs` binary).
    pub async fn wait(mut self) {
        let _ = (&mut self.task).await;
    }
}

impl Drop for TestKbs {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("the HTTPS test needs the `openssl` command (apt-get install openssl)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A throwaway CA (PEM) and a server certificate for the IP address `ip` it signed, made with
/// the `openssl` command in `dir`.
pub fn test_pki(dir: &Path, ip: &str) -> (Vec<u8>, TlsIdentity) {
    let cn = format!("/CN={ip}");
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    let mut a = vec!["req", "-x509"];
    a.extend(ec);
    a.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=kbs-test-ca",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign",
    ]);
    openssl(dir, &a);
    let mut b = vec!["req"];
    b.extend(ec);
    b.extend(["-keyout", "leaf.key", "-out", "leaf.csr", "-subj", &cn]);
    openssl(dir, &b);
    std::fs::write(
        dir.join("leaf.ext"),
        format!("subjectAltName=IP:{ip}\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n"),
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "leaf.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "leaf.pem",
            "-days",
            "2",
            "-extfile",
            "leaf.ext",
        ],
    );
    let rd = |n: &str| std::fs::read(dir.join(n)).unwrap();
    (
        rd("ca.pem"),
        TlsIdentity {
            cert_chain_pem: rd("leaf.pem"),
            key_pem: rd("leaf.key"),
        },
    )
}
