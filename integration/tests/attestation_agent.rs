//! The guest-puller as the attestation-agent kata-agent starts: the workspace binary through a
//! symlink named `attestation-agent`, with kata-agent 4.1's exact argv, answering the AA's
//! ttrpc API (evidence, a KBS token over HTTPS with the pod's initdata, runtime events); a
//! CDH-mode guest-puller that measures each pulled image through it; and initdata the platform
//! refuses, which stops the agent before its socket exists.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use cdh_api::protos::{
    attestation_agent as pb, attestation_agent_ttrpc::AttestationAgentServiceClient,
};
use guest_puller::aa::client::{pull_image_content, EVENT_DOMAIN, PULL_IMAGE_OPERATION};
use guest_puller::aa::eventlog;
use integration::kbs::{test_pki, TestKbs, TestKbsConfig};
use integration::lab::wait_for;
use integration::{bin_path, push_test_image, Lab, Registry};
use sha2::{Digest, Sha384};
use ttrpc::Code;

/// How long kata-agent waits for the AA's socket by default (`launch_process_timeout`).
const AGENT_WAIT: Duration = Duration::from_secs(6);
const T: Duration = Duration::from_secs(60);

const INITDATA: &str = "version = \"0.1.0\"\nalgorithm = \"sha384\"\n\n[data]\n\"policy.rego\" = '''\npackage agent_policy\n'''\n";

/// `<lab>/bin/<name>` → the workspace's guest-puller, as the guest image installs it.
fn symlink(lab: &Lab, name: &str) -> PathBuf {
    let dir = lab.join("bin");
    fs::create_dir_all(&dir).unwrap();
    let link = dir.join(name);
    let _ = fs::remove_file(&link);
    std::os::unix::fs::symlink(bin_path("guest-puller"), &link).unwrap();
    link
}

/// Where kata-agent's files go, inside the lab.
struct Paths {
    socket: PathBuf,
    initdata: PathBuf,
    aa_toml: PathBuf,
    eventlog: PathBuf,
}

fn paths(lab: &Lab) -> Paths {
    let init = lab.join("run/initdata");
    fs::create_dir_all(&init).unwrap();
    Paths {
        // The directory does not exist: the agent creates it, as it does under /run.
        socket: lab.join("run/attestation-agent/attestation-agent.sock"),
        initdata: init.join("initdata.toml"),
        aa_toml: init.join("aa.toml"),
        eventlog: lab.join("run/aael/eventlog"),
    }
}

/// kata-agent's launch of the AA: `--attestation_sock <uri> [--initdata-toml <p>] [-c <p>]`.
fn agent_command(lab: &Lab, p: &Paths, initdata: bool, config: bool) -> Command {
    let mut cmd = Command::new(symlink(lab, "attestation-agent"));
    cmd.arg("--attestation_sock")
        .arg(format!("unix://{}", p.socket.display()));
    if initdata {
        cmd.arg("--initdata-toml").arg(&p.initdata);
    }
    if config {
        cmd.arg("-c").arg(&p.aa_toml);
    }
    cmd.env("AAEL_PATH", &p.eventlog)
        .env("GUEST_PULLER_LOG", "info")
        .env_remove("AA_KBC_PARAMS");
    cmd
}

/// Starts the AA as a lab daemon and waits for its socket as kata-agent does; returns how long
/// the socket took.
fn start_agent(lab: &Lab, p: &Paths, cmd: Command) -> Duration {
    let started = Instant::now();
    lab.spawn("attestation-agent", cmd);
    wait_for("the attestation-agent socket", T, || {
        p.socket.exists() || !lab.is_running("attestation-agent")
    });
    assert!(
        p.socket.exists(),
        "the attestation-agent exited:\n{}",
        lab.log("attestation-agent")
    );
    started.elapsed()
}

async fn client(socket: &Path) -> AttestationAgentServiceClient {
    let c = ttrpc::r#async::Client::connect(&format!("unix://{}", socket.display()))
        .await
        .unwrap();
    AttestationAgentServiceClient::new(c)
}

fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(T.as_nanos() as i64)
}

fn extend_req(domain: &str, operation: &str, content: &str) -> pb::ExtendRuntimeMeasurementRequest {
    let mut r = pb::ExtendRuntimeMeasurementRequest::new();
    r.Domain = domain.into();
    r.Operation = operation.into();
    r.Content = content.into();
    r
}

fn code(e: ttrpc::Error) -> (Code, String) {
    match e {
        ttrpc::Error::RpcStatus(s) => (s.code(), s.message().to_string()),
        other => panic!("expected a ttrpc status, got {other:?}"),
    }
}

/// The CDH as kata-agent starts it (`confidential-data-hub -c <cdh config>`), pointed at the AA.
fn start_cdh(lab: &Lab, reg: &Registry<'_>, aa_socket: &Path) -> PathBuf {
    let sock = lab.join("run/cdh.sock");
    let cfg = lab.join("run/initdata/cdh.toml");
    fs::write(
        &cfg,
        format!(
            "socket = \"unix://{sock}\"\n\
             [image]\nwork_dir = \"{work}\"\nbundle_roots = [\"{bundles}\"]\n\
             [image.registry_config]\ninsecure_registries = [\"{reg}\"]\n\
             [aa]\naa_socket = \"unix://{aa}\"\n\
             [initdata]\npath = \"{none}\"\n",
            sock = sock.display(),
            work = lab.join("work").display(),
            bundles = lab.join("bundles").display(),
            reg = reg.host(),
            aa = aa_socket.display(),
            none = lab.join("no-initdata.toml").display(),
        ),
    )
    .unwrap();
    fs::create_dir_all(lab.join("bundles")).unwrap();
    let mut cmd = Command::new(symlink(lab, "confidential-data-hub"));
    cmd.arg("-c").arg(&cfg).env("GUEST_PULLER_LOG", "info");
    lab.spawn("cdh", cmd);
    wait_for("the CDH socket", T, || {
        std::os::unix::net::UnixStream::connect(&sock).is_ok() || !lab.is_running("cdh")
    });
    assert!(lab.is_running("cdh"), "the CDH exited:\n{}", lab.log("cdh"));
    sock
}

/// Runs `cmd` to its end (at most `T`), killing it past that.
fn run_to_exit(cmd: &mut Command) -> (ExitStatus, String) {
    let mut child: Child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + T;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            use std::io::Read;
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            return (status, err);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the attestation-agent did not exit within {T:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_serves_evidence_tokens_and_measures_the_pulls_of_a_cdh() {
    Lab::require_root();
    let lab = Lab::new("aa-mode");
    let p = paths(&lab);

    // The KBS over HTTPS, its CA inline in aa.toml as the reference's schema has it, and
    // expecting the pod's initdata in the attestation request.
    let pki = lab.join("pki");
    fs::create_dir_all(&pki).unwrap();
    let (ca_pem, identity) = test_pki(&pki, "127.0.0.1");
    let mut kcfg = TestKbsConfig::new(lab.join("kbs-resources"));
    kcfg.tls = Some(identity);
    kcfg.init_data_reference = Some(STANDARD.encode(Sha384::digest(INITDATA)));
    let kbs = TestKbs::start(kcfg).await.unwrap();
    fs::write(&p.initdata, INITDATA).unwrap();
    fs::write(
        &p.aa_toml,
        format!(
            "[token_configs.kbs]\nurl = \"{}\"\ncert = '''\n{}'''\n\n\
             [eventlog_config]\nenable_eventlog = true\n",
            kbs.url(),
            String::from_utf8(ca_pem).unwrap()
        ),
    )
    .unwrap();

    let took = start_agent(&lab, &p, agent_command(&lab, &p, true, true));
    assert!(
        took < AGENT_WAIT,
        "the socket took {took:?}, kata-agent waits {AGENT_WAIT:?}"
    );
    assert_eq!(
        kbs.stats().auth,
        0,
        "no KBS traffic before a token is asked for"
    );
    let aa = client(&p.socket).await;

    let tee = aa
        .get_tee_type(ctx(), &pb::GetTeeTypeRequest::new())
        .await
        .unwrap();
    assert_eq!(tee.tee, "sample");
    let mut req = pb::GetEvidenceRequest::new();
    req.RuntimeData = vec![1, 2, 3];
    let ev = aa.get_evidence(ctx(), &req).await.unwrap();
    let ev: serde_json::Value = serde_json::from_slice(&ev.Evidence).unwrap();
    assert_eq!(ev, serde_json::json!({"svn": "1", "report_data": "AQID"}));
    let extra = aa
        .get_additional_tees(ctx(), &pb::GetAdditionalTeesRequest::new())
        .await
        .unwrap();
    assert!(extra.additional_tees.is_empty());

    // GetToken(kbs): one RCAR handshake over HTTPS, with the initdata the KBS expects.
    let mut t = pb::GetTokenRequest::new();
    t.TokenType = "kbs".into();
    let tok = aa.get_token(ctx(), &t).await.unwrap();
    let tok: serde_json::Value = serde_json::from_slice(&tok.Token).unwrap();
    let token = tok["token"].as_str().unwrap().to_string();
    assert_eq!(kbs.issued_tokens(), vec![token.clone()]);
    assert_eq!(kbs.stats().attest_ok, 1);
    let pem = tok["tee_keypair"].as_str().unwrap().to_string();
    kbs_client::TeeKeyPair::from_pkcs8_pem(&pem).expect("the TEE key, PKCS#8");
    t.TokenType = "coco_as".into();
    let (c, m) = code(aa.get_token(ctx(), &t).await.unwrap_err());
    assert_eq!(c, Code::INTERNAL, "{m}");

    let r = aa
        .extend_runtime_measurement(ctx(), &extend_req("example.org", "Boot", "first"))
        .await
        .unwrap();
    assert_eq!(r.Result.enum_value(), Ok(pb::RuntimeMeasurementResult::OK));

    // A CDH on the same guest: every pulled image becomes a PullImage event.
    let reg = Registry::start(&lab);
    let img = push_test_image(&reg, "aa/app:v1", 1, &["/bin/true"]);
    let cdh = start_cdh(&lab, &reg, &p.socket);
    let bundle = lab.join("bundles/c1");
    let digest = cdh_api::client::pull_image(&cdh, &img.reference, &bundle, T)
        .await
        .unwrap();
    assert_eq!(digest, img.manifest_digest);
    let log = eventlog::parse(&fs::read(&p.eventlog).unwrap()).unwrap();
    assert_eq!(log.len(), 2, "{log:?}");
    assert_eq!(log[0].event.operation, "Boot");
    let pull = &log[1];
    assert_eq!(pull.event.domain, EVENT_DOMAIN);
    assert_eq!(pull.event.operation, PULL_IMAGE_OPERATION);
    assert_eq!(
        pull.event.content,
        format!(
            "{{\"image\":\"{}\", \"digest\":\"{}\"}}",
            img.reference, img.manifest_digest
        )
    );
    assert_eq!(
        pull.event.content,
        pull_image_content(&img.reference, &digest)
    );
    assert_eq!(pull.ccmr, 4, "the default PCR 17 is RTMR 3");
    assert!(lab.log("cdh").contains("PullImage event measured"));

    // Neither the token nor the TEE key reaches a log.
    for name in ["attestation-agent", "cdh"] {
        let l = lab.log(name);
        assert!(!l.contains(&token), "{name} logged the token");
        assert!(
            !l.contains(pem.lines().nth(1).unwrap()),
            "{name} logged the key"
        );
    }

    // Without its AA the CDH cannot measure: the pull fails (as CDH's does) and the bundle
    // is taken down again.
    lab.stop("attestation-agent");
    let bundle2 = lab.join("bundles/c2");
    let (c, m) = code(
        cdh_api::client::pull_image(&cdh, &img.reference, &bundle2, T)
            .await
            .unwrap_err(),
    );
    assert_eq!(c, Code::UNAVAILABLE, "{m}");
    assert!(m.contains("ExtendRuntimeMeasurement"), "{m}");
    assert!(
        !bundle2.join("rootfs").exists(),
        "the unmeasured bundle was left behind"
    );
    assert_eq!(
        eventlog::parse(&fs::read(&p.eventlog).unwrap())
            .unwrap()
            .len(),
        2
    );
    lab.stop("cdh");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_aa_toml_the_kbs_comes_from_aa_kbc_params_and_the_log_is_off() {
    Lab::require_root();
    let lab = Lab::new("aa-default");
    let p = paths(&lab);
    let kbs = TestKbs::start(TestKbsConfig::new(lab.join("kbs-resources")))
        .await
        .unwrap();
    // No initdata, no aa.toml: kata-agent's argv is the socket alone.
    let mut cmd = agent_command(&lab, &p, false, false);
    cmd.env("AA_KBC_PARAMS", format!("cc_kbc::{}", kbs.url()));
    start_agent(&lab, &p, cmd);
    let aa = client(&p.socket).await;
    let mut t = pb::GetTokenRequest::new();
    t.TokenType = "kbs".into();
    let tok = aa.get_token(ctx(), &t).await.unwrap();
    let tok: serde_json::Value = serde_json::from_slice(&tok.Token).unwrap();
    assert_eq!(
        kbs.issued_tokens(),
        vec![tok["token"].as_str().unwrap().to_string()]
    );
    let r = aa
        .extend_runtime_measurement(ctx(), &extend_req("example.org", "Boot", "x"))
        .await
        .unwrap();
    assert_eq!(
        r.Result.enum_value(),
        Ok(pb::RuntimeMeasurementResult::NOT_ENABLED)
    );
    assert!(!p.eventlog.exists());
    lab.stop("attestation-agent");
}

#[test]
fn initdata_the_platform_refuses_stops_the_agent_before_it_binds() {
    Lab::require_root();
    let lab = Lab::new("aa-initdata");
    let p = paths(&lab);
    fs::write(&p.aa_toml, "[eventlog_config]\nenable_eventlog = true\n").unwrap();
    // The sample platform checks no register, so what it refuses is initdata no TEE could
    // have been launched with: not TOML, an unknown digest algorithm, no file at all.
    for (name, text) in [
        (
            "not TOML",
            Some("version = \"0.1.0\"\nalgorithm = \"sha384\"\n[data\n"),
        ),
        (
            "md5",
            Some("version = \"0.1.0\"\nalgorithm = \"md5\"\n[data]\n"),
        ),
        ("missing", None),
    ] {
        match text {
            Some(t) => fs::write(&p.initdata, t).unwrap(),
            None => {
                let _ = fs::remove_file(&p.initdata);
            }
        }
        let (status, stderr) = run_to_exit(&mut agent_command(&lab, &p, true, true));
        assert!(!status.success(), "{name}: exited {status}");
        assert!(stderr.contains("initdata"), "{name}: {stderr}");
        assert!(!p.socket.exists(), "{name}: the socket was bound");
        assert!(!p.eventlog.exists(), "{name}: the event log was opened");
    }
    // The same argv with initdata it accepts binds the socket.
    fs::write(&p.initdata, INITDATA).unwrap();
    start_agent(&lab, &p, agent_command(&lab, &p, true, true));
    lab.stop("attestation-agent");
    assert!(!p.socket.exists(), "the socket is removed at shutdown");
}
