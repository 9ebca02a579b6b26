//! guest-puller: pulls, verifies, decrypts and unpacks container images inside the TEE guest.

pub mod aa;
pub mod api;
pub mod bundle;
pub mod bundles;
pub mod cdh_config;
pub mod config;
pub mod decrypt;
pub mod error;
pub mod fetcher;
pub mod initdata;
pub mod keyprovider;
pub mod layer;
pub mod lazy;
pub mod node_cache;
pub mod policy;
pub mod proxy;
pub mod pull;
pub mod registry;
pub mod resource;
pub mod rootfs;
pub mod sealed;
pub mod secure_mount;
pub mod startup;
pub mod unpack;
