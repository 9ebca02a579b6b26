//! guest-puller: pulls, verifies, decrypts and unpacks container images inside the TEE guest.

pub mod api;
pub mod bundle;
pub mod bundles;
pub mod config;
pub mod decrypt;
pub mod fetcher;
pub mod keyprovider;
pub mod layer;
pub mod lazy;
pub mod policy;
pub mod pull;
pub mod registry;
pub mod resource;
pub mod rootfs;
pub mod unpack;
