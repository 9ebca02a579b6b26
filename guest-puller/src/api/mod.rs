//! CDH-compatible ttrpc API: `api.ImagePullService` and `keyprovider.KeyProviderService`.

pub mod client;
pub mod server;

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
    /// `package keyprovider` services.
    pub mod keyprovider_ttrpc {
        include!(concat!(env!("OUT_DIR"), "/protos/keyprovider_ttrpc.rs"));
    }
}
