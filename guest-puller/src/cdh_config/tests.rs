use super::*;
use crate::config::ListenAddr;

/// Every key of CDH's documented schema (`CdhConfig` + image-rs `ImageConfig` + its registry
/// configuration), written for these tests.
const EVERY_CDH_KEY: &str = r#"
socket = "unix:///run/confidential-containers/cdh.sock"
skip_sealed_secret_verification = false

[aa]
aa_socket = "unix:///run/confidential-containers/attestation-agent/attestation-agent.sock"

[kbc]
name = "cc_kbc"
url = "https://kbs.test:8080"
kbs_cert = """
-----BEGIN CERTIFICATE-----
MIIBtest
-----END CERTIFICATE-----
"""

[[credentials]]
resource_uri = "kbs:///default/app/token"
path = "/run/confidential-containers/cdh/kbs/app/token"

[[credentials]]
resource_uri = "kbs:///default/app/config"
path = "/run/confidential-containers/cdh/kbs/app/config"

[image]
work_dir = "/run/image-rs"
max_concurrent_layer_downloads_per_image = 4
image_security_policy_uri = "kbs:///default/security-policy/test"
image_security_policy = '{"default":[{"type":"reject"}]}'
sigstore_config_uri = "kbs:///default/sigstore-config/test"
sigstore_config = "default-docker:\n  sigstore: file:///var/lib/sigstore\n"
authenticated_registry_credentials_uri = "kbs:///default/credential/test"
registry_configuration_uri = "kbs:///default/registry-configuration/test"
extra_root_certificates = ["""
-----BEGIN CERTIFICATE-----
MIIBroot
-----END CERTIFICATE-----
"""]
kbc = "sample_kbc"
kbs_uri = "null"

[image.registry_config]
unqualified-search-registries = ["docker.io", "quay.io"]

[[image.registry_config.registry]]
prefix = "example.com/blocked"
blocked = true

[[image.registry_config.registry]]
prefix = "example.com/app"
insecure = false
blocked = false
location = "registry.internal/app"

[[image.registry_config.registry.mirror]]
location = "mirror.internal/app"
insecure = true

[image.image_pull_proxy]
https_proxy = "http://proxy.test:3128"
http_proxy = "http://proxy.test:3128"
no_proxy = "localhost,registry.internal"

[log]
level = "debug"
"#;

#[test]
fn every_documented_cdh_key_parses_and_maps() {
    let c = Config::from_toml(EVERY_CDH_KEY).unwrap();
    assert_eq!(
        c.server.addresses(),
        vec![ListenAddr::Unix(
            "/run/confidential-containers/cdh.sock".into()
        )]
    );
    assert_eq!(
        c.aa.socket_path(),
        PathBuf::from("/run/confidential-containers/attestation-agent/attestation-agent.sock")
    );
    assert_eq!(c.kbs.url.as_deref(), Some("https://kbs.test:8080"));
    assert!(c.kbs.cert_pem.as_deref().unwrap().contains("MIIBtest"));
    assert_eq!(c.credentials.len(), 2);
    assert_eq!(c.credentials[1].resource_uri, "kbs:///default/app/config");
    assert_eq!(c.image.work_dir, PathBuf::from("/run/image-rs"));
    assert_eq!(c.image.max_concurrent_layer_downloads_per_image, 4);
    // The URIs win over their inline twins, as in CDH.
    assert_eq!(
        c.image.image_security_policy_uri.as_deref(),
        Some("kbs:///default/security-policy/test")
    );
    assert_eq!(
        c.image.sigstore_config_uri.as_deref(),
        Some("kbs:///default/sigstore-config/test")
    );
    assert!(c.image.extra_root_certificates[0].contains("MIIBroot"));
    let rc = c.image.registry_config.as_ref().unwrap();
    assert!(rc.registry[0].blocked);
    assert_eq!(rc.registry[1].location, "registry.internal/app");
    assert!(rc.registry[1].mirror[0].insecure);
    assert_eq!(c.log_filter(), Some("debug"));
    assert_eq!(c.skip_sealed_secret_verification, Some(false));
    let proxy = c.image.image_pull_proxy.as_ref().unwrap();
    assert_eq!(proxy.https_proxy.as_deref(), Some("http://proxy.test:3128"));
    assert_eq!(
        proxy.no_proxy.as_deref(),
        Some("localhost,registry.internal")
    );
    assert_eq!(
        c.unimplemented_keys(),
        vec![
            "[image.registry_config] unqualified-search-registries (short names resolve on docker.io)",
            "[image] image_security_policy (image_security_policy_uri takes priority, as in CDH)",
            "[image] sigstore_config (sigstore_config_uri takes priority, as in CDH)",
            "[image] kbc (image-rs keywrap-native only)",
            "[image] kbs_uri (image-rs keywrap-native only)",
        ]
    );
}

#[test]
fn a_minimal_initdata_cdh_toml_works_with_an_inline_policy() {
    // What a pod's initdata typically carries: the KBS and the policy inline.
    let policy = r#"{"default":[{"type":"sigstoreSigned","keyPath":"kbs:///default/cosign/key"}]}"#;
    let c = Config::from_toml(&format!(
        "[kbc]\nname = \"cc_kbc\"\nurl = \"http://10.0.2.101:8080\"\n[image]\nimage_security_policy = '{policy}'\n"
    ))
    .unwrap();
    assert_eq!(c.kbs.url.as_deref(), Some("http://10.0.2.101:8080"));
    let uri = c.image.image_security_policy_uri.as_deref().unwrap();
    let b64 = uri
        .strip_prefix("data:;base64,")
        .expect("inline policy as a data: URI");
    assert_eq!(STANDARD.decode(b64).unwrap(), policy.as_bytes());
    assert!(
        c.unimplemented_keys().is_empty(),
        "{:?}",
        c.unimplemented_keys()
    );
    // CDH's defaults: the CDH socket, the AA socket, no credentials.
    assert_eq!(
        c.server.addresses(),
        vec![ListenAddr::Unix(crate::config::DEFAULT_SOCKET.into())]
    );
    assert_eq!(
        c.aa.socket_path(),
        PathBuf::from("/run/confidential-containers/attestation-agent/attestation-agent.sock")
    );
    // An empty kbs_cert (CDH's "no certificate") and an empty url mean none.
    let c = Config::from_toml("[kbc]\nname = \"cc_kbc\"\nurl = \"\"\nkbs_cert = \"\"\n").unwrap();
    assert_eq!((c.kbs.url, c.kbs.cert_pem), (None, None));
}

#[test]
fn unknown_keys_fail_naming_the_key_and_the_line() {
    for (text, key, line) in [
        (
            "[kbc]\nname = \"cc_kbc\"\nurl = \"\"\nkbs_certs = \"x\"\n",
            "kbs_certs",
            4,
        ),
        (
            "socket = \"unix:///x.sock\"\n\n[image]\nimage_policy = \"x\"\n",
            "image_policy",
            4,
        ),
        ("[log]\nlevel = \"info\"\nformat = \"json\"\n", "format", 3),
        (
            "[[credentials]]\nresource_uri = \"kbs:///a/b/c\"\npath = \"/x\"\nmode = 1\n",
            "mode",
            4,
        ),
        (
            "[image.image_pull_proxy]\nsocks_proxy = \"x\"\n",
            "socks_proxy",
            2,
        ),
        ("bogus = 1\n", "bogus", 1),
    ] {
        let e = Config::from_toml(text).unwrap_err().to_string();
        assert!(e.contains(&format!("`{key}`")), "{text}: {e}");
        assert!(e.contains(&format!("line {line}")), "{text}: {e}");
    }
}

#[test]
fn values_guest_puller_cannot_honour_are_refused() {
    for (text, why) in [
        (
            "[kbc]\nname = \"offline_fs_kbc\"\nurl = \"\"\n",
            "offline_fs_kbc",
        ),
        ("[kbc]\nurl = \"http://k\"\n", "name"),
        (
            "[kbc]\nname = \"cc_kbc\"\nurl = \"http://a\"\n[kbs]\nurl = \"http://b\"\n",
            "disagree",
        ),
        (
            "socket = \"unix:///a.sock\"\n[server]\nlisten = [\"unix:///b.sock\"]\n",
            "both set",
        ),
        ("socket = \"127.0.0.1:50000\"\n", "absolute"),
    ] {
        let e = Config::from_toml(text).unwrap_err().to_string();
        assert!(e.contains(why), "{text}: {e}");
    }
}

#[test]
fn guest_puller_format_stays_a_superset() {
    // Own keys and CDH keys in one file, one type.
    let c = Config::from_toml(
        "[kbs]\nurl = \"http://k\"\ncert_pem = \"PEM\"\n[keys]\nproviders = [\"p\"]\n\
         [initdata]\npath = \"/tmp/initdata.toml\"\n[image]\nforce_eager = true\n\
         [[credentials]]\nresource_uri = \"kbs:///a/b/c\"\npath = \"/run/confidential-containers/cdh/kbs/c\"\n",
    )
    .unwrap();
    assert_eq!(c.kbs.cert_pem.as_deref(), Some("PEM"));
    assert_eq!(c.initdata.path, PathBuf::from("/tmp/initdata.toml"));
    assert!(c.image.force_eager);
    assert_eq!(c.credentials.len(), 1);
}

#[test]
fn aa_kbc_params_from_env_or_kernel_cmdline() {
    let mut c = Config::default();
    c.apply_aa_kbc_params(
        None,
        "console=ttyS0 agent.aa_kbc_params=cc_kbc::http://10.0.2.101:8080 quiet",
    )
    .unwrap();
    assert_eq!(c.kbs.url.as_deref(), Some("http://10.0.2.101:8080"));
    let mut c = Config::default();
    c.apply_aa_kbc_params(
        Some("cc_kbc::http://env:1"),
        "agent.aa_kbc_params=cc_kbc::http://cmd:2",
    )
    .unwrap();
    assert_eq!(c.kbs.url.as_deref(), Some("http://env:1"));
    let mut c = Config::default();
    c.apply_aa_kbc_params(None, "quiet").unwrap();
    assert_eq!(c.kbs.url, None);
    assert!(c.apply_aa_kbc_params(Some("nonsense"), "").is_err());
}

#[test]
fn credential_paths_stay_below_the_cdh_directory() {
    let base = Path::new(CREDENTIALS_DIR);
    assert!(credential_target("/run/confidential-containers/cdh/kbs/a/b", base).is_ok());
    for bad in [
        "/run/confidential-containers/cdh/kbs",
        "/run/confidential-containers/cdh/kbs/../../../etc/passwd",
        "/run/confidential-containers/cdh/kbs/./x",
        "/run/confidential-containers/cdh/kbsx/y",
        "/etc/shadow",
        "relative/path",
    ] {
        assert!(credential_target(bad, base).is_err(), "{bad} accepted");
    }
}

#[test]
fn ocicrypt_config_lists_provider_names() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("ocicrypt.json");
    assert!(ocicrypt_provider_names(&p).unwrap().is_empty());
    std::fs::write(
        &p,
        r#"{"key-providers":{"attestation-agent":{"ttrpc":"unix:///run/confidential-containers/cdh.sock"},"enterprise-kp":{"grpc":"127.0.0.1:50000"}}}"#,
    )
    .unwrap();
    assert_eq!(
        ocicrypt_provider_names(&p).unwrap(),
        vec!["attestation-agent".to_string(), "enterprise-kp".to_string()]
    );
    std::fs::write(&p, "{not json").unwrap();
    let e = ocicrypt_provider_names(&p).unwrap_err().to_string();
    assert!(e.contains("OCICRYPT_KEYPROVIDER_CONFIG"), "{e}");
}
