//! Generates the gRPC (tonic) service stubs of ocicrypt's keyprovider for `guestpull-keyprovider`.
//! The messages are cdh-api's (compiled once from `keyprovider.proto` for ttrpc); only the
//! service glue is generated here, with a rust-protobuf codec, so the proto is not compiled twice.

fn main() {
    let method = |name: &str, route: &str| {
        tonic_build::manual::Method::builder()
            .name(name)
            .route_name(route)
            .input_type("crate::grpc::KeyProviderKeyWrapProtocolInput")
            .output_type("crate::grpc::KeyProviderKeyWrapProtocolOutput")
            .codec_path("crate::grpc::ProtobufCodec")
            .build()
    };
    let service = tonic_build::manual::Service::builder()
        .name("KeyProviderService")
        .package("keyprovider")
        .method(method("wrap_key", "WrapKey"))
        .method(method("un_wrap_key", "UnWrapKey"))
        .build();
    tonic_build::manual::Builder::new().compile(&[service]);
    println!("cargo:rerun-if-changed=build.rs");
}
