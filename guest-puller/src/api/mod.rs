//! CDH-compatible ttrpc API: `api.ImagePullService`, `SealedSecretService`,
//! `GetResourceService`, `SecureMountService` and `keyprovider.KeyProviderService`.
//! The wire types live in the `cdh-api` crate, shared with the snapshotter's mount helper.

pub mod server;

pub use cdh_api::{client, protos};
