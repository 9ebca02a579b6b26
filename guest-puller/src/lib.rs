//! guest-puller: pulls, verifies, decrypts and unpacks container images inside the TEE guest.

pub mod config;
pub mod decrypt;
pub mod jwe;
pub mod policy;
pub mod registry;
pub mod resource;
pub mod unpack;
