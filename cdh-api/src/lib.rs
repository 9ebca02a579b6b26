//! The Confidential Data Hub ttrpc API as kata-agent speaks it: `api.ImagePullService`,
//! `api.SealedSecretService`, `api.GetResourceService`, `api.SecureMountService` and
//! `keyprovider.KeyProviderService`. One crate so the guest-puller (server) and the
//! snapshotter's local-guest mount helper (client) share the exact wire types.

pub mod client;

/// Default CDH socket kata-agent dials.
pub const DEFAULT_SOCKET: &str = "/run/confidential-containers/cdh.sock";

/// Generated protobuf/ttrpc bindings.
#[allow(
    missing_docs,
    clippy::all,
    unused_imports,
    unused_qualifications,
    unused_mut,
    dead_code,
    non_upper_case_globals,
    non_camel_case_types,
    non_snake_case
)]
pub mod protos {
    /// `package api` messages.
    pub mod api {
        include!(concat!(env!("OUT_DIR"), "/protos/api.rs"));
    }
    /// `package api` services.
    pub mod api_ttrpc {
        include!(concat!(env!("OUT_DIR"), "/protos/api_ttrpc.rs"));
    }
    /// `package keyprovider` messages.
    pub mod keyprovider {
        include!(concat!(env!("OUT_DIR"), "/protos/keyprovider.rs"));
    }
    /// `package attestation_agent` messages (the attestation-agent a CDH calls).
    pub mod attestation_agent {
        include!(concat!(env!("OUT_DIR"), "/protos/attestation_agent.rs"));
    }
    /// `package attestation_agent` services.
    pub mod attestation_agent_ttrpc {
        include!(concat!(
            env!("OUT_DIR"),
            "/protos/attestation_agent_ttrpc.rs"
        ));
    }
    /// `package keyprovider` services.
    pub mod keyprovider_ttrpc {
        include!(concat!(env!("OUT_DIR"), "/protos/keyprovider_ttrpc.rs"));
    }
}

pub use ttrpc;
