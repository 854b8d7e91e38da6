//! Compiles the vendored etcd v3 API (`proto/`, see `proto/README.md`) with
//! protox (pure Rust; no system `protoc`) into a tonic client.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["etcd/api/etcdserverpb/rpc.proto"];
    println!("cargo:rerun-if-changed=proto");
    let descriptors = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        .build_server(false)
        .build_client(true)
        .skip_protoc_run()
        .compile_fds(descriptors)?;
    Ok(())
}
