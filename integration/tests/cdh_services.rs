//! The CDH services kata-agent uses besides image pull, served by `guest-puller serve` against the
//! test KBS over the ttrpc socket: `SealedSecretService.UnsealSecret` (a sealed secret made the
//! way CDH's `secret seal` makes it, its ES256 key and the secret itself in the KBS) and
//! `GetResourceService.GetResource`.

use std::path::PathBuf;
use std::time::Duration;

use cdh_api::client::{get_resource_at, unseal_secret_at, Endpoint};
use integration::chain::{rpc_status, serve_cdh, KbsProcess};
use integration::sealed::public_jwk;
use integration::Lab;
use p256::ecdsa::SigningKey;
use ttrpc::Code;

const SIGNING_KID: &str = "kbs:///default/sealed-secret/signing";
const SECRET_URI: &str = "kbs:///default/secret/db-password";
const PLAINTEXT: &[u8] = b"correct horse battery staple";
const T: Duration = Duration::from_secs(30);

fn seal(key: &SigningKey, name: &str) -> Vec<u8> {
    integration::sealed::seal(key, SIGNING_KID, name).into_bytes()
}

fn serve(lab: &Lab, kbs: &KbsProcess<'_>) -> PathBuf {
    serve_cdh(lab, kbs, &[])
}

#[tokio::test]
async fn sealed_secrets_unseal_from_the_kbs_and_forgeries_are_denied() {
    Lab::require_root();
    let lab = Lab::new("cdh-sealed");
    let kbs = KbsProcess::start(&lab);
    let key = SigningKey::random(&mut rand_core::OsRng);
    kbs.put("default/sealed-secret/signing", &public_jwk(&key));
    kbs.put("default/secret/db-password", PLAINTEXT);
    let ep = Endpoint::Unix(serve(&lab, &kbs));

    let plain = unseal_secret_at(&ep, &seal(&key, SECRET_URI), T)
        .await
        .unwrap();
    assert_eq!(plain, PLAINTEXT);

    let forger = SigningKey::random(&mut rand_core::OsRng);
    let (c, m) = rpc_status(
        unseal_secret_at(&ep, &seal(&forger, SECRET_URI), T)
            .await
            .unwrap_err(),
    );
    assert_eq!(c, Code::PERMISSION_DENIED, "{m}");
    assert!(m.contains(SIGNING_KID), "{m}");

    let (c, m) = rpc_status(
        unseal_secret_at(&ep, &seal(&key, "kbs:///default/secret/absent"), T)
            .await
            .unwrap_err(),
    );
    assert_eq!(c, Code::NOT_FOUND, "{m}");

    // The plaintext travels only in the reply: never in the guest-puller's or the KBS' log.
    let needle = String::from_utf8_lossy(PLAINTEXT).to_string();
    assert!(!lab.log("guest-puller").contains(&needle));
    assert!(!kbs.log().contains(&needle));
}

#[tokio::test]
async fn get_resource_serves_kbs_resources_only_and_keeps_kbs_decisions() {
    Lab::require_root();
    let lab = Lab::new("cdh-resource");
    let kbs = KbsProcess::start(&lab);
    kbs.put("default/cert/ca", b"-----BEGIN CERTIFICATE-----\n");
    let ep = Endpoint::Unix(serve(&lab, &kbs));
    assert_eq!(
        get_resource_at(&ep, "kbs:///default/cert/ca", T)
            .await
            .unwrap(),
        b"-----BEGIN CERTIFICATE-----\n"
    );
    let (c, m) = rpc_status(
        get_resource_at(&ep, "file:///etc/shadow", T)
            .await
            .unwrap_err(),
    );
    assert_eq!(c, Code::INVALID_ARGUMENT, "{m}");
    kbs.set_policy("mode = \"deny-all\"\n");
    let (c, m) = rpc_status(
        get_resource_at(&ep, "kbs:///default/cert/ca", T)
            .await
            .unwrap_err(),
    );
    assert_eq!(c, Code::PERMISSION_DENIED, "{m}");
}
