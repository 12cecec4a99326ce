//! The tests' own Workload API server (`simnode::spire`), generated from
//! `proto/workload.proto` with tonic. `cargo xtask setup` installs protoc.

fn main() {
    println!("cargo:rerun-if-changed=proto/workload.proto");
    tonic_prost_build::configure()
        .build_client(false)
        .compile_protos(&["proto/workload.proto"], &["proto"])
        .unwrap_or_else(|e| panic!("generating the Workload API server: {e} (is protoc installed? `cargo xtask setup` installs it)"));
}
