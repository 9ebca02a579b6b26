//! Minimal ttrpc client for `api.ImagePullService/PullImage` (used by the snapshotter's
//! mount helper in local-guest mode and by tests).

use std::path::Path;

use crate::protos::{api, api_ttrpc};

/// Calls `PullImage{image_url, bundle_path}` on the server at `socket`; returns the manifest digest.
pub async fn pull_image(
    socket: &Path,
    image: &str,
    bundle: &Path,
    timeout: std::time::Duration,
) -> Result<String, ttrpc::Error> {
    let c = ttrpc::r#async::Client::connect(&format!("unix://{}", socket.display())).await?;
    let client = api_ttrpc::ImagePullServiceClient::new(c);
    let mut req = api::ImagePullRequest::new();
    req.image_url = image.to_string();
    req.bundle_path = bundle.to_string_lossy().into_owned();
    let resp = client
        .pull_image(
            ttrpc::context::with_timeout(timeout.as_nanos().min(i64::MAX as u128) as i64),
            &req,
        )
        .await?;
    Ok(resp.manifest_digest)
}
