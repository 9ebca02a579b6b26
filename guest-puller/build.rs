//! Generates the gRPC (tonic) bindings of ocicrypt's keyprovider service for `guestpull-keyprovider`.
//! The proto is the one cdh-api serves over ttrpc, so both transports share one wire definition.

fn main() {
    let proto = "../cdh-api/protos/keyprovider.proto";
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_protos(&[proto], &["../cdh-api/protos"])
        .expect("keyprovider gRPC codegen (is protoc installed?)");
    println!("cargo:rerun-if-changed={proto}");
}
