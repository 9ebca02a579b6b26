//! Generates the host-side ttrpc bindings of kata-agent's API (protos/agent.proto), the calls
//! the Kata shim makes, for the VM test that drives the real agent.

fn main() {
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("protos");
    std::fs::create_dir_all(&out).expect("create protos out dir");
    ttrpc_codegen::Codegen::new()
        .out_dir(&out)
        .inputs(["protos/agent.proto"])
        .include("protos")
        .rust_protobuf()
        .customize(ttrpc_codegen::Customize {
            async_all: true,
            ..Default::default()
        })
        .run()
        .expect("ttrpc codegen of protos/agent.proto");
    // The generated files carry inner attributes, which `include!` inside a module rejects.
    for entry in std::fs::read_dir(&out).expect("read protos out dir") {
        let path = entry.expect("dir entry").path();
        let text = std::fs::read_to_string(&path).expect("read generated file");
        let kept: Vec<&str> = text
            .lines()
            .filter(|l| !l.starts_with("#![") && !l.starts_with("//!"))
            .collect();
        std::fs::write(&path, kept.join("\n")).expect("rewrite generated file");
    }
    println!("cargo:rerun-if-changed=protos");
}
