//! Generates containerd's Snapshots API (server, and a client for tests and tools) on
//! tonic 0.14 from the protos in `proto/`, so the daemon has one gRPC stack.

fn main() {
    let proto = "proto/containerd/services/snapshots/v1/snapshots.proto";
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_protos(&[proto], &["proto"])
        .expect("snapshots API codegen (is protoc installed?)");
    println!("cargo:rerun-if-changed=proto");
}
