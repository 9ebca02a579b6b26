//! The puller and kbs-client against hostile servers on 127.0.0.1: huge and trickling bodies,
//! stalls and redirects must fail fast, with bounded memory, and with the right status code.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use integration::hostile::{Behaviour, HostileServer, Request};
use integration::kbs::{ResourcePolicy, TestKbs, TestKbsConfig};
use integration::{bin_path, Lab};
use kbs_client::{Client, ClientConfig, Error, ErrorKind, Mode, ResourceUri, Tee};
use sha2::{Digest, Sha256};
use ttrpc::Code;

const GIB: u64 = 1 << 30;

fn sha256(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(b)))
}

/// A valid one-layer image: (manifest, config, layer descriptor digest).
fn tiny_image() -> (Vec<u8>, Vec<u8>, String) {
    let layer_digest = sha256(b"layer");
    let config = serde_json::json!({"architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [sha256(b"diff")]}, "config": {}})
    .to_string()
    .into_bytes();
    let manifest = serde_json::json!({"schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": sha256(&config), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": layer_digest, "size": 1000}]})
    .to_string()
    .into_bytes();
    (manifest, config, layer_digest)
}

fn manifest_answer(body: &[u8]) -> Behaviour {
    Behaviour::Respond {
        status: 200,
        headers: vec![
            (
                "Content-Type".into(),
                "application/vnd.oci.image.manifest.v1+json".into(),
            ),
            ("Docker-Content-Digest".into(), sha256(body)),
        ],
        body: body.to_vec(),
    }
}

fn envelope(status: u16, code: &str) -> Behaviour {
    Behaviour::Respond {
        status,
        headers: vec![("Content-Type".into(), "application/json".into())],
        body: format!(r#"{{"errors":[{{"code":"{code}","message":"{code}"}}]}}"#).into_bytes(),
    }
}

/// A registry whose repository name picks the misbehaviour.
async fn hostile_registry() -> HostileServer {
    let (manifest, config, layer) = tiny_image();
    let config_digest = sha256(&config);
    HostileServer::start(move |req: &Request| {
        let p = req.path.as_str();
        if p == "/v2/" {
            return Behaviour::json("{}");
        }
        let repo = p
            .strip_prefix("/v2/")
            .and_then(|r| r.split('/').next())
            .unwrap_or("");
        let is_manifest = p.contains("/manifests/");
        match (repo, is_manifest) {
            ("notfound", true) => envelope(404, "MANIFEST_UNKNOWN"),
            ("denied", true) => envelope(401, "UNAUTHORIZED"),
            ("down", _) => envelope(503, "UNAVAILABLE"),
            ("stall", true) => Behaviour::Stall,
            ("trickle", true) => Behaviour::Trickle {
                every: Duration::from_secs(20),
            },
            ("huge", true) => Behaviour::Huge {
                status: 200,
                content_length: false,
                total: 2 * GIB,
                fill: b' ',
            },
            ("hugelen", true) => Behaviour::Huge {
                status: 200,
                content_length: true,
                total: 2 * GIB,
                fill: b' ',
            },
            ("huge404", true) => Behaviour::Huge {
                status: 404,
                content_length: false,
                total: 2 * GIB,
                fill: b' ',
            },
            ("schema1", true) => Behaviour::json(r#"{"schemaVersion":1,"name":"x","tag":"t"}"#),
            ("integrity", true) => manifest_answer(&manifest),
            (_, true) => manifest_answer(&manifest),
            ("hugeconfig", false) if p.ends_with(&config_digest) => Behaviour::Huge {
                status: 200,
                content_length: false,
                total: 2 * GIB,
                fill: b'{',
            },
            (_, false) if p.ends_with(&config_digest) => Behaviour::json(config.clone()),
            ("blobstall", false) if p.ends_with(&layer) => Behaviour::Stall,
            _ => envelope(404, "BLOB_UNKNOWN"),
        }
    })
    .await
    .expect("start hostile registry")
}

/// A puller config with 2 s deadlines for `reg`; `image_extra` goes into `[image]`.
fn puller_config(lab: &Lab, reg: &HostileServer, image_extra: &str) -> PathBuf {
    let cfg = lab.join("puller.toml");
    std::fs::write(
        &cfg,
        format!(
            "[image]\nwork_dir = \"{}\"\nbundle_roots = [\"{}\"]\nmax_retries = 2\n\
             registry_request_timeout_secs = 2\nregistry_stall_timeout_secs = 2\n{image_extra}\n\
             [image.registry_config]\ninsecure_registries = [\"{}\"]\n",
            lab.join("work").display(),
            lab.path().display(),
            reg.host()
        ),
    )
    .unwrap();
    cfg
}

/// Runs `guest-puller pull`; returns (success, stderr, elapsed, peak RSS in KiB).
fn pull_measured(cfg: &Path, image: &str, bundle: &Path) -> (bool, String, Duration, i64) {
    let started = Instant::now();
    // Reaped by wait4 below, which also reports the peak RSS that `wait()` would not.
    #[allow(clippy::zombie_processes)]
    let child = Command::new(bin_path("guest-puller"))
        .args(["pull", "--config"])
        .arg(cfg)
        .arg(image)
        .arg("--bundle")
        .arg(bundle)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run guest-puller");
    let pid = child.id() as libc::pid_t;
    let stderr = child.stderr.expect("stderr");
    let reader = std::thread::spawn(move || std::io::read_to_string(stderr).unwrap_or_default());
    let mut status = 0;
    // SAFETY: rusage is plain data, and pid is our own child, waited for exactly once here.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(r, pid, "wait4");
    let ok = libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
    (
        ok,
        reader.join().unwrap(),
        started.elapsed(),
        usage.ru_maxrss,
    )
}

#[test]
fn huge_manifests_fail_at_the_cap_with_bounded_memory() {
    let lab = Lab::new("hostile-huge");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let reg = rt.block_on(hostile_registry());
    let cfg = puller_config(&lab, &reg, "");
    // The process's own footprint: a pull that fails on a small 404.
    let image = format!("{}/notfound:t", reg.host());
    let (_, _, _, baseline_kib) = pull_measured(&cfg, &image, &lab.join("baseline"));
    eprintln!("baseline peak RSS {baseline_kib} KiB");
    for repo in ["huge", "hugelen", "hugeconfig", "huge404"] {
        let before = reg.body_bytes_sent();
        let image = format!("{}/{repo}:t", reg.host());
        let (ok, err, took, rss_kib) = pull_measured(&cfg, &image, &lab.join(repo));
        let sent = reg.body_bytes_sent() - before;
        eprintln!("{repo}: {took:?}, peak RSS {rss_kib} KiB, {sent} body bytes sent");
        assert!(!ok, "{repo}: a 2 GiB document must not be accepted");
        if repo == "huge404" {
            assert!(err.contains("404"), "{repo}: {err}");
        } else {
            assert!(err.contains("larger than the"), "{repo}: {err}");
        }
        assert!(took < Duration::from_secs(20), "{repo}: took {took:?}");
        // The 8 MiB cap on top of the process itself; the old code reached 4 GiB.
        assert!(
            rss_kib < baseline_kib + (48 << 10),
            "{repo}: peak RSS {rss_kib} KiB, baseline {baseline_kib} KiB"
        );
        // Socket buffers let the server run ahead of the reader, but not by gigabytes.
        assert!(sent < 256 << 20, "{repo}: server sent {sent} bytes");
    }
}

#[test]
fn stalled_and_trickling_registries_time_out_within_the_deadline() {
    let lab = Lab::new("hostile-slow");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let reg = rt.block_on(hostile_registry());
    let cfg = puller_config(&lab, &reg, "");
    // Deadlines of 2 s: a manifest that never comes or comes a byte per 20 s, and a layer
    // whose transfer stalls.
    for repo in ["stall", "trickle", "blobstall"] {
        let image = format!("{}/{repo}:t", reg.host());
        let (ok, err, took, _) = pull_measured(&cfg, &image, &lab.join(repo));
        eprintln!("{repo}: failed after {took:?}");
        assert!(!ok, "{repo}");
        assert!(err.contains("timed out"), "{repo}: {err}");
        assert!(took < Duration::from_secs(12), "{repo}: took {took:?}");
    }
}

/// A `guest-puller serve` process on a unix socket; killed on drop.
struct Server {
    child: Child,
    socket: PathBuf,
}

impl Server {
    fn start(lab: &Lab, name: &str, cfg: &Path) -> Server {
        let socket = lab.join(&format!("{name}.sock"));
        let log = std::fs::File::create(lab.log_path(name)).unwrap();
        let child = Command::new(bin_path("guest-puller"))
            .args(["serve", "--config"])
            .arg(cfg)
            .arg("--socket")
            .arg(&socket)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start guest-puller serve");
        integration::lab::wait_for("guest-puller socket", Duration::from_secs(20), || {
            socket.exists()
        });
        Server { child, socket }
    }

    async fn pull_code(&self, image: &str, bundle: &Path) -> (Code, String) {
        match cdh_api::client::pull_image(&self.socket, image, bundle, Duration::from_secs(60))
            .await
        {
            Ok(d) => panic!("{image}: pulled {d}"),
            Err(ttrpc::Error::RpcStatus(s)) => (s.code(), s.message().to_string()),
            Err(e) => panic!("{image}: {e:?}"),
        }
    }

    async fn unwrap_code(&self, kid: &str) -> (Code, String) {
        use base64::Engine;
        use cdh_api::protos::{keyprovider, keyprovider_ttrpc};
        let client = keyprovider_ttrpc::KeyProviderServiceClient::new(
            cdh_api::client::connect(&cdh_api::client::Endpoint::Unix(self.socket.clone()))
                .await
                .unwrap(),
        );
        let b64 = base64::engine::general_purpose::STANDARD;
        let packet = serde_json::json!({"kid": kid, "wrap_type": "A256GCM",
            "wrapped_data": b64.encode([1u8; 48]), "iv": b64.encode([2u8; 12])})
        .to_string();
        let input = serde_json::json!({"op": "keyunwrap",
            "keyunwrapparams": {"annotation": b64.encode(packet)}});
        let mut req = keyprovider::KeyProviderKeyWrapProtocolInput::new();
        req.KeyProviderKeyWrapProtocolInput = input.to_string().into_bytes();
        match client
            .un_wrap_key(ttrpc::context::with_timeout(60_000_000_000), &req)
            .await
        {
            Ok(_) => panic!("{kid}: unwrapped"),
            Err(ttrpc::Error::RpcStatus(s)) => (s.code(), s.message().to_string()),
            Err(e) => panic!("{kid}: {e:?}"),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn every_error_kind_reaches_the_ttrpc_caller_as_its_code() {
    let lab = Lab::new("hostile-codes");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let reg = rt.block_on(hostile_registry());
    let host = reg.host();
    let policy = serde_json::json!({"default": [{"type": "insecureAcceptAnything"}],
        "transports": {"docker": {format!("{host}/rejected"): [{"type": "reject"}]}}});
    let cfg = puller_config(
        &lab,
        &reg,
        &format!("image_security_policy_uri = '{policy}'\n"),
    );
    let server = Server::start(&lab, "codes", &cfg);
    let wrong = format!("sha256:{}", "0".repeat(64));
    let cases = [
        ("not a reference!".to_string(), Code::INVALID_ARGUMENT),
        (format!("{host}/notfound:t"), Code::NOT_FOUND),
        (format!("{host}/denied:t"), Code::PERMISSION_DENIED),
        (format!("{host}/rejected:t"), Code::PERMISSION_DENIED),
        (format!("{host}/down:t"), Code::UNAVAILABLE),
        (format!("{host}/stall:t"), Code::DEADLINE_EXCEEDED),
        (format!("{host}/huge:t"), Code::RESOURCE_EXHAUSTED),
        (format!("{host}/schema1:t"), Code::UNIMPLEMENTED),
        (format!("{host}/integrity@{wrong}"), Code::DATA_LOSS),
    ];
    rt.block_on(async {
        for (i, (image, want)) in cases.iter().enumerate() {
            let (code, msg) = server.pull_code(image, &lab.join(&format!("b{i}"))).await;
            assert_eq!(code, *want, "{image}: {msg}");
        }
    });
    drop(server);

    // A kbs:// resource without a KBS is a configuration problem; a KBS that is down is an
    // outage, for the policy fetch and for key unwrapping alike.
    let nokbs = lab.join("nokbs.toml");
    std::fs::write(
        &nokbs,
        std::fs::read_to_string(&cfg).unwrap().replace(
            &format!("image_security_policy_uri = '{policy}'"),
            "image_security_policy_uri = 'kbs:///default/policy/p'",
        ),
    )
    .unwrap();
    let server = Server::start(&lab, "nokbs", &nokbs);
    rt.block_on(async {
        let (code, msg) = server
            .pull_code(&format!("{host}/any:t"), &lab.join("nk"))
            .await;
        assert_eq!(code, Code::FAILED_PRECONDITION, "{msg}");
    });
    drop(server);

    let dead = integration::lab::free_port();
    let down = lab.join("kbsdown.toml");
    std::fs::write(
        &down,
        format!(
            "{}\n[kbs]\nurl = \"http://127.0.0.1:{dead}\"\nrequest_timeout_secs = 3\n",
            std::fs::read_to_string(&nokbs).unwrap()
        ),
    )
    .unwrap();
    let server = Server::start(&lab, "kbsdown", &down);
    rt.block_on(async {
        let (code, msg) = server
            .pull_code(&format!("{host}/any:t"), &lab.join("kd"))
            .await;
        assert_eq!(code, Code::UNAVAILABLE, "policy fetch: {msg}");
        let (code, msg) = server.unwrap_code("kbs:///default/key/k1").await;
        assert_eq!(code, Code::UNAVAILABLE, "key unwrap: {msg}");
    });
}

/// A passport-mode client (no attestation round trip) for the KBS at `url`.
fn passport_client(url: &str, deadline: Duration) -> Client {
    let key = kbs_client::TeeKeyPair::generate(kbs_client::KeyAlgorithm::EcP256).unwrap();
    let mut cfg = ClientConfig::new(url);
    cfg.tee = Some(Tee::Sample);
    cfg.deadline = deadline;
    cfg.retry.max_attempts = 2;
    // {"alg":"none"}.{"exp":4102444800}.sig: only the expiry is read by the client.
    let token = "eyJhbGciOiJub25lIn0.eyJleHAiOjQxMDI0NDQ4MDB9.c2ln";
    cfg.mode = Mode::Passport {
        token: Some(zeroize::Zeroizing::new(token.into())),
        tee_key_pem: Some(key.to_pkcs8_pem().unwrap()),
    };
    Client::new(cfg).unwrap()
}

fn uri(s: &str) -> ResourceUri {
    s.parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kbs_bodies_are_capped_redirects_refused_and_stalls_time_out() {
    let elsewhere = HostileServer::start(|_| Behaviour::json("{}"))
        .await
        .unwrap();
    let target = format!("{}/kbs/v0/resource/default/key/k1", elsewhere.url());
    let kbs = HostileServer::start(move |req: &Request| {
        match req.path.rsplit('/').next().unwrap_or("") {
            "huge" => Behaviour::Huge {
                status: 200,
                content_length: false,
                total: GIB,
                fill: b'{',
            },
            "hugelen" => Behaviour::Huge {
                status: 200,
                content_length: true,
                total: GIB,
                fill: b'{',
            },
            "huge500" => Behaviour::Huge {
                status: 500,
                content_length: false,
                total: GIB,
                fill: b'x',
            },
            "redirect" => Behaviour::Redirect {
                status: 302,
                location: target.clone(),
            },
            "trickle" => Behaviour::Trickle {
                every: Duration::from_secs(20),
            },
            _ => Behaviour::Stall,
        }
    })
    .await
    .unwrap();
    let c = passport_client(&kbs.url(), Duration::from_secs(2));
    for tag in ["huge", "hugelen", "huge500"] {
        let before = kbs.body_bytes_sent();
        let started = Instant::now();
        let e = c
            .get_resource(&uri(&format!("kbs:///default/key/{tag}")))
            .await
            .unwrap_err();
        let sent = kbs.body_bytes_sent() - before;
        assert!(matches!(e, Error::TooLarge { .. }), "{tag}: {e}");
        assert_eq!(e.kind(), ErrorKind::ResourceExhausted);
        assert!(started.elapsed() < Duration::from_secs(5), "{tag}");
        assert!(sent < 64 << 20, "{tag}: {sent} bytes sent");
    }
    let e = c
        .get_resource(&uri("kbs:///default/key/redirect"))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Redirect { status: 302, .. }), "{e}");
    assert!(e.to_string().contains(&elsewhere.url()), "{e}");
    assert!(elsewhere.requests().is_empty(), "the redirect was followed");
    for tag in ["stall", "trickle"] {
        let started = Instant::now();
        let e = c
            .get_resource(&uri(&format!("kbs:///default/key/{tag}")))
            .await
            .unwrap_err();
        let took = started.elapsed();
        assert!(e.to_string().contains("timed out"), "{tag}: {e}");
        assert_eq!(e.kind(), ErrorKind::TimedOut, "{tag}");
        assert!(took < Duration::from_secs(4), "{tag}: {took:?}");
    }

    // The attestation answers are capped too (background-check mode attests first).
    let auth = HostileServer::start(|_| Behaviour::Huge {
        status: 200,
        content_length: false,
        total: GIB,
        fill: b'{',
    })
    .await
    .unwrap();
    let mut cfg = ClientConfig::new(auth.url());
    cfg.tee = Some(Tee::Sample);
    let e = Client::new(cfg).unwrap().attest().await.unwrap_err();
    assert!(matches!(e, Error::TooLarge { .. }), "{e}");
}

/// Collects every log line, `log` records included, at trace level.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn trace_logs_of_a_full_attestation_hold_no_session_id_or_token() {
    let captured = Captured::default();
    let w = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || w.clone())
        .with_ansi(false)
        .finish();
    // cookie stores and hyper log through `log`; forward those records as well.
    let _ = tracing_log::LogTracer::init();
    let _guard = tracing::subscriber::set_default(subscriber);
    // One thread, so every task logs into this thread's subscriber.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("default/key")).unwrap();
    std::fs::write(dir.path().join("default/key/k1"), b"kek").unwrap();
    let (sessions, tokens) = rt.block_on(async {
        let kbs = TestKbs::start(TestKbsConfig::new(dir.path()))
            .await
            .unwrap();
        let mut cfg = ClientConfig::new(kbs.url());
        cfg.tee = Some(Tee::Sample);
        let c = Client::new(cfg).unwrap();
        assert_eq!(
            &*c.get_resource(&uri("kbs:///default/key/k1")).await.unwrap(),
            b"kek"
        );
        // A refused session (new policy) makes the client present the cookie again.
        kbs.set_policy(ResourcePolicy::AllowListed { allow: vec![] });
        let _ = c.get_resource(&uri("kbs:///default/key/k1")).await;
        (kbs.issued_sessions(), kbs.issued_tokens())
    });
    let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert!(
        logs.contains("attested to KBS"),
        "tracing was captured: {logs}"
    );
    assert!(logs.contains("TRACE"), "trace-level records were captured");
    assert!(!sessions.is_empty() && !tokens.is_empty());
    for s in &sessions {
        assert!(!logs.contains(s.as_str()), "session id {s} in logs");
    }
    for t in &tokens {
        let sig = t.rsplit('.').next().unwrap();
        assert!(!logs.contains(sig), "token in logs");
    }
}

#[test]
fn a_jwe_key_revoked_in_the_kbs_stops_decrypting_new_images() {
    let lab = Lab::new("hostile-revoke");
    Lab::require_root();
    Lab::require_cmd("skopeo", "skopeo");
    Lab::require_cmd("openssl", "openssl");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let reg = integration::Registry::start(&lab);
    let kdir = lab.join("kbs");
    std::fs::create_dir_all(kdir.join("default/key")).unwrap();
    let pem = kdir.join("default/key/jwe");
    let public = lab.join("jwe.pub");
    integration::lab::rsa_key_pair(&pem, &public);
    let encrypted = |name: &str, layers: usize| {
        let plain =
            integration::push_test_image(&reg, &format!("lab/{name}:plain"), layers, &["/bin/sh"]);
        let enc = format!("{}/lab/{name}:enc", reg.host());
        integration::lab::run_ok(Command::new("skopeo").args([
            "copy",
            "--src-tls-verify=false",
            "--dest-tls-verify=false",
            "--encryption-key",
            &format!("jwe:{}", public.display()),
            &format!("docker://{}", plain.reference),
            &format!("docker://{enc}"),
        ]));
        enc
    };
    let (first, second) = (encrypted("one", 2), encrypted("two", 1));
    rt.block_on(async {
        let kbs = TestKbs::start(TestKbsConfig::new(&kdir)).await.unwrap();
        let cfg = guest_puller::config::Config::from_toml(&format!(
            "[image]\nwork_dir = \"{}\"\nbundle_roots = [\"{}\"]\n\
             [image.registry_config]\ninsecure_registries = [\"{}\"]\n\
             [kbs]\nurl = \"{}\"\n[keys]\njwe_private_keys = [\"kbs:///default/key/jwe\"]\n\
             jwe_key_cache_secs = 2\n",
            lab.join("work").display(),
            lab.path().display(),
            reg.host(),
            kbs.url()
        ))
        .unwrap();
        let fetcher = guest_puller::fetcher::KbsResourceFetcher::new(&cfg.kbs).unwrap();
        let puller = guest_puller::pull::Puller::new(cfg, Arc::new(fetcher))
            .await
            .unwrap();
        let before = kbs.stats().resource_ok;
        puller.pull_image(&first, &lab.join("b1")).await.unwrap();
        // Two encrypted layers, one key fetch: the key lives for the configured lifetime.
        assert_eq!(kbs.stats().resource_ok - before, 1);
        kbs.set_policy(ResourcePolicy::AllowListed { allow: vec![] });
        tokio::time::sleep(Duration::from_millis(2100)).await;
        let e = puller
            .pull_image(&second, &lab.join("b2"))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Denied, "{e}");
        assert!(e.to_string().contains("kbs:///default/key/jwe"), "{e}");
    });
    integration::lab::unmount_under(lab.path());
}
