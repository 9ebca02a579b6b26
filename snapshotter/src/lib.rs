//! guestpull snapshotter: a containerd proxy snapshotter that lets Confidential
//! Containers pull images inside the guest (drop-in for nydus-snapshotter proxy mode),
//! plus the library half of the `nydus-overlayfs` mount helper.

pub mod api;
pub mod config;
pub mod containerd_config;
pub mod engine;
pub mod error;
pub mod filter;
pub mod limits;
pub mod local_guest;
pub mod mounts;
pub mod overlay;
pub mod server;
pub mod service;
pub mod store;
pub mod volume;

pub use config::Config;
pub use engine::Engine;
pub use error::{Error, Result};
pub use service::GuestPullService;
