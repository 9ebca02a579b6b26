//! Test harness for guestpull's end-to-end tests: private labs, a real registry, real containerd.
//!
//! Everything here starts real components (Debian's `docker-registry`, containerd 1.6/1.7/2.1,
//! runc, umoci, skopeo) under a private directory per test, and fails loudly when one is missing.

pub mod aa;
pub mod chain;
pub mod containerd;
pub mod hostile;
pub mod images;
pub mod kata_agent;
pub mod kbs;
pub mod lab;
pub mod node;
pub mod node_cache;
pub mod proxy;
pub mod registry;
pub mod sealed;
pub mod snapshotter_env;
pub mod vm;

pub use containerd::{Containerd, ContainerdOpts, ContainerdVersion};
pub use images::{push_test_image, PushedImage};
pub use lab::{bin_path, Lab};
pub use registry::Registry;
