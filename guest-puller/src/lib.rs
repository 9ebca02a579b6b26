//! guest-puller: pulls, verifies, decrypts and unpacks container images inside the TEE guest.

pub mod policy;
pub mod resource;
