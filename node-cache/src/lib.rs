//! guestpull node cache: a host-side, node-local, content-addressed blob cache.
//!
//! Confidential guests on one node share layer blobs through it by digest. The host only
//! *carries* blobs: every guest verifies each blob it receives against the digest in a manifest
//! it checked itself, and (by default) only ciphertext of encrypted layers is ever sent here.
//! See `README.md` for the wire protocol, what the host learns, and the limits.
//!
//! - [`protocol`]: URL layout and digest syntax, std only; what the guest client uses
//!   (`node-cache = { default-features = false }`).
//! - `store` and `server` (feature `server`): the daemon.

pub mod protocol;
#[cfg(feature = "server")]
pub mod server;
#[cfg(feature = "server")]
pub mod store;
