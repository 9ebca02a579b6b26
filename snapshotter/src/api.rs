//! containerd's Snapshots gRPC API, generated from `proto/` (tonic 0.14, prost).
//!
//! The modules mirror the proto packages, which the generated code's relative paths need.

#![allow(missing_docs, clippy::all)]

/// Proto package `containerd`.
pub mod containerd {
    /// `containerd.types`: the mount description.
    pub mod types {
        tonic::include_proto!("containerd.types");
    }
    /// `containerd.services`.
    pub mod services {
        /// `containerd.services.snapshots`.
        pub mod snapshots {
            /// `containerd.services.snapshots.v1`: the service a proxy snapshotter serves.
            pub mod v1 {
                tonic::include_proto!("containerd.services.snapshots.v1");
            }
        }
    }
}

pub use containerd::services::snapshots::v1 as snapshots;
pub use containerd::types;
