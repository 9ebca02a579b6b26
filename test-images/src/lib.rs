//! Builds guestpull's test images deterministically (no Docker): OCI layouts written in Rust,
//! pushed, encrypted and signed with the real tools users have (skopeo, cosign).

pub mod catalog;
pub mod installer;
pub mod layer;
pub mod layout;
pub mod nydus;
pub mod push;
