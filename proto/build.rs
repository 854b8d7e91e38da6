//! Compiles `custody/v1/*.proto` with protox (pure Rust; no system `protoc`).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "custody/v1/keys.proto",
        "custody/v1/signing.proto",
        "custody/v1/audit.proto",
        "custody/v1/approvals.proto",
        "custody/v1/envelope.proto",
        "custody/v1/ceremony.proto",
    ];
    for file in files {
        println!("cargo:rerun-if-changed={file}");
    }
    let descriptors = protox::compile(files, ["."])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    let descriptor_path = out.join("custody_descriptor.bin");
    std::fs::write(
        &descriptor_path,
        prost::Message::encode_to_vec(&descriptors),
    )?;
    // Undecodable requests are the caller's error (INVALID_ARGUMENT), not
    // ours (tonic-prost says INTERNAL): see src/codec.rs.
    tonic_prost_build::configure()
        .codec_path("crate::codec::Codec")
        .file_descriptor_set_path(&descriptor_path)
        .skip_protoc_run()
        .compile_fds(descriptors)?;
    Ok(())
}
