//! kbs-client against the in-process test KBS: protocol flow, token reuse, error policy, CLI.

use std::path::Path;
use std::time::{Duration, Instant};

use base64::Engine;
use integration::kbs::{ResourcePolicy, TestKbs, TestKbsConfig};
use kbs_client::{Client, ClientConfig, Error, KeyAlgorithm, Mode, ResourceUri, RetryPolicy, Tee};

const SECRET: &[u8] = b"s3cr3t-kek-0123456789abcdef-UNIQUE-MARKER";

fn seed(dir: &Path) {
    let d = dir.join("default/key");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("k1"), SECRET).unwrap();
    for i in 0..100 {
        std::fs::write(d.join(format!("n{i}")), format!("value-{i}")).unwrap();
    }
    let c = dir.join("default/cert");
    std::fs::create_dir_all(&c).unwrap();
    std::fs::write(c.join("c1"), b"cert").unwrap();
}

async fn start(f: impl FnOnce(&mut TestKbsConfig)) -> (TestKbs, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    seed(dir.path());
    let mut cfg = TestKbsConfig::new(dir.path());
    f(&mut cfg);
    (TestKbs::start(cfg).await.expect("start test KBS"), dir)
}

fn client_cfg(url: &str) -> ClientConfig {
    let mut cfg = ClientConfig::new(url);
    cfg.tee = Some(Tee::Sample);
    cfg.timeout = Duration::from_secs(10);
    cfg
}

fn uri(s: &str) -> ResourceUri {
    s.parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_resource_bytes_equal_ec_and_rsa() {
    let (kbs, _d) = start(|_| {}).await;
    for alg in [KeyAlgorithm::EcP256, KeyAlgorithm::Rsa] {
        let mut cfg = client_cfg(&kbs.url());
        cfg.key_algorithm = alg;
        let c = Client::new(cfg).unwrap();
        let got = c.get_resource(&uri("kbs:///default/key/k1")).await.unwrap();
        assert_eq!(&*got, SECRET, "{alg:?}");
        // An authority in the URI is ignored (the configured KBS is used), as in CDH.
        let got = c
            .get_resource(&uri("kbs://elsewhere:1/default/cert/c1"))
            .await
            .unwrap();
        assert_eq!(&*got, b"cert");
    }
    let s = kbs.stats();
    assert_eq!((s.auth, s.attest_ok), (2, 2), "{s:?}");
    assert_eq!(
        s.resource_unauthorized, 0,
        "first GET must not take a 401 round trip: {s:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_data_reaches_the_token_claims() {
    let (kbs, _d) = start(|_| {}).await;
    let mut cfg = client_cfg(&kbs.url());
    cfg.init_data = Some(
        "version = \"0.1.0\"\nalgorithm = \"sha384\"\n[data]\n\"cdh.toml\" = \"marker-42\"\n"
            .into(),
    );
    let c = Client::new(cfg).unwrap();
    let t = c.attest().await.unwrap();
    let claims = t.as_str().split('.').nth(1).unwrap();
    let claims: serde_json::Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(claims)
            .unwrap(),
    )
    .unwrap();
    let ae = &claims["submods"]["cpu0"]["ear.veraison.annotated-evidence"];
    assert_eq!(ae["init_data_claims"]["cdh.toml"], "marker-42", "{claims}");
    assert!(ae["runtime_data_claims"]["tee-pubkey"].is_object());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_attestation_for_100_resources() {
    let (kbs, _d) = start(|_| {}).await;
    let c = Client::new(client_cfg(&kbs.url())).unwrap();
    let mut tasks = Vec::new();
    for i in 0..100 {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            let v = c
                .get_resource(&uri(&format!("kbs:///default/key/n{i}")))
                .await
                .unwrap();
            assert_eq!(&*v, format!("value-{i}").as_bytes());
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let s = kbs.stats();
    assert_eq!(
        (s.auth, s.attest, s.resource, s.resource_ok),
        (1, 1, 100, 100),
        "{s:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_deny_fails_fast_with_one_attestation() {
    let (kbs, _d) = start(|c| {
        c.policy = ResourcePolicy::AllowListed {
            allow: vec!["default/cert/*".into()],
        }
    })
    .await;
    let c = Client::new(client_cfg(&kbs.url())).unwrap();
    let e = c
        .get_resource(&uri("kbs:///default/key/k1"))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::PolicyDeny { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("default/key/k1") && msg.contains(&kbs.url()) && msg.contains("policy"),
        "{msg}"
    );
    assert_eq!(e.exit_code(), 3);
    assert_eq!(
        &*c.get_resource(&uri("kbs:///default/cert/c1"))
            .await
            .unwrap(),
        b"cert"
    );
    let s = kbs.stats();
    assert_eq!((s.auth, s.attest, s.resource), (1, 1, 2), "{s:?}");

    kbs.set_policy(ResourcePolicy::DenyAll);
    let e = c
        .get_resource(&uri("kbs:///default/cert/c1"))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::PolicyDeny { .. }), "{e}");
    assert_eq!(kbs.stats().attest, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_resource_is_not_found_without_reattesting() {
    let (kbs, _d) = start(|_| {}).await;
    let c = Client::new(client_cfg(&kbs.url())).unwrap();
    let e = c
        .get_resource(&uri("kbs:///default/key/absent"))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::ResourceNotFound { .. }), "{e}");
    assert!(
        e.to_string()
            .contains("missing resource or KBS backend error"),
        "{e}"
    );
    assert!(e.to_string().contains("default/key/absent"), "{e}");
    assert_eq!(e.exit_code(), 4);
    let s = kbs.stats();
    assert_eq!((s.auth, s.attest, s.resource), (1, 1, 1), "{s:?}");
    // A plugin the KBS lacks is a fatal 404.
    let e = c.get_resource(&uri("kbs+nosuch:///a/b")).await.unwrap_err();
    assert!(matches!(e, Error::InvalidPath { .. }), "{e}");
    assert!(e.to_string().contains("PluginNotFound"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_expiry_reattests_once() {
    let (kbs, _d) = start(|c| c.session_ttl = Duration::from_secs(1)).await;
    let c = Client::new(client_cfg(&kbs.url())).unwrap();
    assert_eq!(
        &*c.get_resource(&uri("kbs:///default/key/k1")).await.unwrap(),
        SECRET
    );
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(
        &*c.get_resource(&uri("kbs:///default/key/k1")).await.unwrap(),
        SECRET
    );
    let s = kbs.stats();
    assert_eq!((s.auth, s.attest_ok), (2, 2), "{s:?}");
    assert_eq!((s.resource, s.resource_unauthorized), (3, 1), "{s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_expiry_reattests_before_exp_not_after_401() {
    let (kbs, _d) = start(|c| c.token_ttl = Duration::from_secs(2)).await;
    let c = Client::new(client_cfg(&kbs.url())).unwrap();
    let t1 = c.attest().await.unwrap();
    assert_eq!(
        c.attest().await.unwrap().as_str(),
        t1.as_str(),
        "token is cached"
    );
    assert_eq!(
        &*c.get_resource(&uri("kbs:///default/key/k1")).await.unwrap(),
        SECRET
    );
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(
        &*c.get_resource(&uri("kbs:///default/key/k1")).await.unwrap(),
        SECRET
    );
    let s = kbs.stats();
    assert_eq!(s.attest_ok, 2, "{s:?}");
    assert_eq!(s.resource_unauthorized, 0, "re-attested proactively: {s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passport_mode_uses_bearer_and_reattests_once_when_token_rejected() {
    let (kbs, _d) = start(|_| {}).await;
    let mut cfg = client_cfg(&kbs.url());
    cfg.mode = Mode::Passport {
        token: None,
        tee_key_pem: None,
    };
    let c = Client::new(cfg).unwrap();
    assert_eq!(
        &*c.get_resource(&uri("kbs:///default/key/k1")).await.unwrap(),
        SECRET
    );

    // Hand the token and key to a second client, as AA hands them to CDH.
    let token = c.attest().await.unwrap();
    let mut cfg = client_cfg(&kbs.url());
    cfg.mode = Mode::Passport {
        token: Some(token.as_str().to_string().into()),
        tee_key_pem: Some(c.tee_key().to_pkcs8_pem().unwrap()),
    };
    let c2 = Client::new(cfg).unwrap();
    assert_eq!(
        &*c2.get_resource(&uri("kbs:///default/cert/c1"))
            .await
            .unwrap(),
        b"cert"
    );
    let s = kbs.stats();
    assert_eq!(s.attest_ok, 1, "{s:?}");

    // A token from another KBS (bad signature) is refused: exactly one fresh attestation.
    let (other, _d2) = start(|_| {}).await;
    let foreign = Client::new({
        let mut c = client_cfg(&other.url());
        c.mode = Mode::Passport {
            token: None,
            tee_key_pem: None,
        };
        c
    })
    .unwrap();
    let ft = foreign.attest().await.unwrap();
    let mut cfg = client_cfg(&kbs.url());
    cfg.mode = Mode::Passport {
        token: Some(ft.as_str().to_string().into()),
        tee_key_pem: Some(foreign.tee_key().to_pkcs8_pem().unwrap()),
    };
    let c3 = Client::new(cfg).unwrap();
    assert_eq!(
        &*c3.get_resource(&uri("kbs:///default/cert/c1"))
            .await
            .unwrap(),
        b"cert"
    );
    let s = kbs.stats();
    assert_eq!((s.attest_ok, s.resource_unauthorized), (2, 1), "{s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kbs_not_running_retries_then_names_the_url() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let url = format!("http://127.0.0.1:{port}");
    let mut cfg = client_cfg(&url);
    cfg.retry = RetryPolicy {
        max_attempts: 4,
        initial_backoff: Duration::from_millis(100),
        max_backoff: Duration::from_millis(400),
    };
    let c = Client::new(cfg).unwrap();
    let t0 = Instant::now();
    let e = c
        .get_resource(&uri("kbs:///default/key/k1"))
        .await
        .unwrap_err();
    let took = t0.elapsed();
    match &e {
        Error::Unreachable {
            url: u, attempts, ..
        } => {
            assert_eq!(u, &url);
            assert_eq!(*attempts, 4);
        }
        other => panic!("expected Unreachable, got {other}"),
    }
    assert!(
        e.to_string().contains(&url) && e.to_string().to_lowercase().contains("refused"),
        "{e}"
    );
    // 3 backoffs of at most 100+200+400 ms (jitter only shortens them) plus connect attempts.
    assert!(
        took >= Duration::from_millis(350) && took < Duration::from_secs(5),
        "{took:?}"
    );
    assert_eq!(e.exit_code(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_jwe_tag_is_an_error() {
    let (kbs, _d) = start(|c| c.tamper_jwe_tag = true).await;
    let c = Client::new(client_cfg(&kbs.url())).unwrap();
    let e = c
        .get_resource(&uri("kbs:///default/key/k1"))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Decrypt { .. }), "{e}");
    assert!(e.to_string().contains("authentication failed"), "{e}");
    assert_eq!(e.exit_code(), 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_upload_and_policy_endpoints() {
    let (kbs, _d) = start(|c| c.policy = ResourcePolicy::DenyAll).await;
    let http = reqwest::Client::new();
    let r = http
        .post(format!("{}/kbs/v0/resource/one/two/three", kbs.url()))
        .body("uploaded")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let policy = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode("mode = \"allow-listed\"\nallow = [\"one/two/*\"]");
    let r = http
        .post(format!("{}/kbs/v0/resource-policy", kbs.url()))
        .json(&serde_json::json!({ "policy": policy }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let c = Client::new(client_cfg(&kbs.url())).unwrap();
    assert_eq!(
        &*c.get_resource(&uri("kbs:///one/two/three")).await.unwrap(),
        b"uploaded"
    );
    // The error body is the reference's, status included.
    let r = http
        .get(format!("{}/kbs/v0/resource/one/two/three", kbs.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(
        body["type"],
        "https://github.com/confidential-containers/kbs/errors/TokenNotFound"
    );
    let r = http
        .get(format!("{}/kbs/v0/resource/one/two", kbs.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}

// ---- CLI ----

async fn cli(args: &[&str]) -> std::process::Output {
    tokio::process::Command::new(integration::bin_path("kbs-client"))
        .args(args)
        .env("RUST_LOG", "trace")
        .output()
        .await
        .expect("run kbs-client")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_fetches_and_never_logs_secrets() {
    let (kbs, _d) = start(|c| {
        c.policy = ResourcePolicy::AllowListed {
            allow: vec!["default/key/*".into()],
        }
    })
    .await;
    let url = kbs.url();
    let out = cli(&[
        "--url",
        &url,
        "--tee",
        "sample",
        "get-resource",
        "kbs:///default/key/k1",
    ])
    .await;
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{stderr}");
    assert_eq!(out.stdout, SECRET);
    assert!(
        stderr.contains("TRACE") || stderr.contains("DEBUG"),
        "trace logging was on: {stderr}"
    );

    let tmp = tempfile::tempdir().unwrap();
    let key_file = tmp.path().join("tee.pem");
    let out = cli(&[
        "--url",
        &url,
        "--tee",
        "sample",
        "attest",
        "--tee-key-file",
        key_file.to_str().unwrap(),
    ])
    .await;
    let stderr2 = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{stderr2}");
    let printed = String::from_utf8(out.stdout).unwrap();
    let token_file = tmp.path().join("token");
    std::fs::write(&token_file, printed.trim()).unwrap();
    let pem = std::fs::read_to_string(&key_file).unwrap();

    // Passport fetch with the handed-over token and key: no new attestation.
    let before = kbs.stats().attest_ok;
    let out_file = tmp.path().join("out");
    let out = cli(&[
        "--url",
        &url,
        "--tee",
        "sample",
        "get-resource",
        "default/key/k1",
        "--attestation-token",
        token_file.to_str().unwrap(),
        "--tee-key-file",
        key_file.to_str().unwrap(),
        "--output",
        out_file.to_str().unwrap(),
    ])
    .await;
    let stderr3 = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{stderr3}");
    assert_eq!(std::fs::read(&out_file).unwrap(), SECRET);
    assert_eq!(kbs.stats().attest_ok, before);

    let tokens = kbs.issued_tokens();
    assert!(!tokens.is_empty());
    let secret = String::from_utf8_lossy(SECRET).to_string();
    let b64 = base64::engine::general_purpose::STANDARD.encode(SECRET);
    let pem_body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    for log in [&stderr, &stderr2, &stderr3] {
        assert!(!log.contains(&secret), "secret in logs");
        assert!(!log.contains(&b64), "secret (base64) in logs");
        for t in &tokens {
            assert!(!log.contains(t.as_str()), "token in logs");
            let sig = t.rsplit('.').next().unwrap();
            assert!(!log.contains(sig), "token signature in logs");
        }
        for line in pem.lines().filter(|l| !l.starts_with("-----")) {
            assert!(!log.contains(line), "TEE private key in logs");
        }
        assert!(!log.contains(&pem_body));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_exit_codes() {
    let (kbs, _d) = start(|c| {
        c.policy = ResourcePolicy::AllowListed {
            allow: vec!["default/key/*".into()],
        }
    })
    .await;
    let url = kbs.url();
    let code = |o: &std::process::Output| o.status.code().unwrap();
    let o = cli(&[
        "--url",
        &url,
        "--tee",
        "sample",
        "get-resource",
        "kbs:///default/cert/c1",
    ])
    .await;
    assert_eq!(code(&o), 3, "{}", String::from_utf8_lossy(&o.stderr));
    assert!(o.stdout.is_empty());
    let o = cli(&[
        "--url",
        &url,
        "--tee",
        "sample",
        "get-resource",
        "kbs:///default/key/absent",
    ])
    .await;
    assert_eq!(code(&o), 4);
    let o = cli(&["--url", &url, "get-resource", "kbs:///default/key"]).await;
    assert_eq!(code(&o), 2);
    assert!(String::from_utf8_lossy(&o.stderr).contains("exactly 3 segments"));
    let o = cli(&["--url", &url]).await;
    assert_eq!(code(&o), 2);
    let o = cli(&[
        "--url",
        "http://127.0.0.1:1",
        "--retries",
        "2",
        "--tee",
        "sample",
        "attest",
    ])
    .await;
    assert_eq!(code(&o), 5);
    assert!(String::from_utf8_lossy(&o.stderr).contains("http://127.0.0.1:1"));

    // Hardware evidence that is not there: a clear evidence error, never a fabricated quote.
    let o = cli(&["--url", &url, "--tee", "tdx", "attest"]).await;
    assert_eq!(code(&o), 6, "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("cannot collect tdx evidence"));

    let (bad, _d2) = start(|c| c.tamper_jwe_tag = true).await;
    let tmp = tempfile::tempdir().unwrap();
    let out_file = tmp.path().join("out");
    let o = cli(&[
        "--url",
        &bad.url(),
        "--tee",
        "sample",
        "get-resource",
        "kbs:///default/key/k1",
        "--output",
        out_file.to_str().unwrap(),
    ])
    .await;
    assert_eq!(code(&o), 7, "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        o.stdout.is_empty() && !out_file.exists(),
        "no output on a tampered response"
    );
}

// ---- HTTPS ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_with_extra_ca() {
    let pki = tempfile::tempdir().unwrap();
    let (ca, id) = integration::kbs::test_pki(pki.path(), "127.0.0.1");
    let (kbs, _d) = start(|c| c.tls = Some(id)).await;
    assert!(kbs.url().starts_with("https://"));

    let mut cfg = client_cfg(&kbs.url());
    cfg.extra_ca_pem = Some(ca);
    let c = Client::new(cfg).unwrap();
    assert_eq!(
        &*c.get_resource(&uri("kbs:///default/key/k1")).await.unwrap(),
        SECRET
    );

    // Without the CA the server is not trusted: an immediate (not retried) error naming the URL.
    let before = kbs.stats().auth;
    let t0 = Instant::now();
    let e = Client::new(client_cfg(&kbs.url()))
        .unwrap()
        .get_resource(&uri("kbs:///default/key/k1"))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Tls { .. }), "{e}");
    assert!(
        t0.elapsed() < Duration::from_millis(200),
        "certificate errors are not retried"
    );
    assert_eq!(kbs.stats().auth, before);
    assert!(e.to_string().contains(&kbs.url()), "{e}");
    assert!(e.to_string().to_lowercase().contains("certificate"), "{e}");

    let mut bad = client_cfg(&kbs.url());
    bad.extra_ca_pem = Some(b"not a certificate".to_vec());
    assert!(matches!(Client::new(bad), Err(Error::Config(_))));
}

// ---- initdata and the attestation-agent ----

const INITDATA: &str = "version = \"0.1.0\"\nalgorithm = \"sha384\"\n\n[data]\n\"cdh.toml\" = '''\n[kbc]\nname = \"cc_kbc\"\nurl = \"http://kbs\"\n'''\n";

fn b64_digest(initdata: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(
        kbs_client::protocol::init_data_digest(initdata)
            .unwrap()
            .digest,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_data_digest_is_checked_against_the_reference_like_trustee() {
    let want = b64_digest(INITDATA);
    let (kbs, _d) = start(|c| c.init_data_reference = Some(want.clone())).await;
    let mut cfg = client_cfg(&kbs.url());
    cfg.init_data = Some(INITDATA.into());
    let t = Client::new(cfg).unwrap().attest().await.unwrap();
    let claims: serde_json::Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(t.as_str().split('.').nth(1).unwrap())
            .unwrap(),
    )
    .unwrap();
    let ae = &claims["submods"]["cpu0"]["ear.veraison.annotated-evidence"];
    // As trustee's sample verifier: the digest joins the TEE claims, cdh.toml becomes JSON.
    assert_eq!(ae["sample"]["init_data"], want, "{claims}");
    assert_eq!(ae["init_data_claims"]["cdh.toml"]["kbc"]["name"], "cc_kbc");

    // Other bytes (one appended comment): refused, naming both digests.
    let tampered = format!("{INITDATA}# changed\n");
    let mut cfg = client_cfg(&kbs.url());
    cfg.init_data = Some(tampered.clone());
    let e = Client::new(cfg).unwrap().attest().await.unwrap_err();
    assert!(matches!(e, Error::Attestation { .. }), "{e}");
    let msg = e.to_string();
    assert!(msg.contains(&want), "{msg}");
    assert!(msg.contains(&b64_digest(&tampered)), "{msg}");
    // No initdata at all is refused too.
    let e = Client::new(client_cfg(&kbs.url()))
        .unwrap()
        .attest()
        .await
        .unwrap_err();
    assert!(e.to_string().contains("no init_data"), "{e}");
}

/// The guest-puller's start-up with `[aa] aa_socket` at a running AA, and without one.
async fn puller_fetch(kbs: &TestKbs, dir: &Path, aa_socket: &Path) -> Vec<u8> {
    let initdata = dir.join("initdata.toml");
    std::fs::write(&initdata, INITDATA).unwrap();
    let mut cfg = guest_puller::config::Config::from_toml(&format!(
        "[kbc]\nname = \"cc_kbc\"\nurl = \"{}\"\n[aa]\naa_socket = \"unix://{}\"\n[initdata]\npath = \"{}\"\n",
        kbs.url(),
        aa_socket.display(),
        initdata.display()
    ))
    .unwrap();
    let prepared = guest_puller::startup::prepare(&mut cfg).await.unwrap();
    use guest_puller::resource::ResourceFetcher;
    prepared
        .fetcher
        .fetch("kbs:///default/key/k1")
        .await
        .unwrap()
        .to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evidence_from_a_running_attestation_agent_else_built_in() {
    let (kbs, d) = start(|c| c.init_data_reference = Some(b64_digest(INITDATA))).await;
    let sock = d.path().join("aa.sock");
    let aa = integration::aa::TestAa::start(&sock).await;
    assert_eq!(puller_fetch(&kbs, d.path(), &sock).await, SECRET);
    // One GetTeeType at start, one GetEvidence for the one handshake; the AA got the unpadded
    // SHA-384 report data, and the KBS accepted it with the initdata the puller sent.
    assert_eq!(aa.calls(), (1, 1));
    assert_eq!(aa.last_runtime_data().len(), 48);
    assert_eq!(kbs.stats().attest_ok, 1);
    aa.stop().await;

    // No socket there: the built-in (sample) attester, the AA is not asked.
    let none = d.path().join("no-aa.sock");
    assert_eq!(puller_fetch(&kbs, d.path(), &none).await, SECRET);
    assert_eq!(kbs.stats().attest_ok, 2);
}
