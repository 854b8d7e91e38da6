//! Generates an EC P-256 key in the HSM, signs the SHA-256 digest of a
//! message with it, and writes the message, the DER signature and the public
//! key PEM to a directory, for `openssl` to verify (see `deploy/demo.sh`).
//!
//! `hsm-demo --module PATH --token-label LABEL --pin-file FILE --out DIR`

use std::path::PathBuf;

use hsm_shim::{
    EcdsaEncoding, Exportability, Hsm, HsmConfig, KeyLabel, KeySpec, PinSource, SignAlgorithm,
    SignInput, TokenSelector,
};
use sha2::Digest;

fn main() {
    if let Err(error) = run() {
        eprintln!("hsm-demo: {error}");
        std::process::exit(1);
    }
}

fn flag(args: &[String], name: &str) -> Result<String, String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
        .ok_or_else(|| format!("missing {name} (usage: hsm-demo --module PATH --token-label LABEL --pin-file FILE --out DIR)"))
}

#[expect(clippy::print_stdout, reason = "a demo tells what it does")]
fn run() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let out = PathBuf::from(flag(&args, "--out")?);
    let pin = PinSource::File(flag(&args, "--pin-file")?.into()).load()?;
    let config = HsmConfig::new(
        flag(&args, "--module")?,
        TokenSelector::Label(flag(&args, "--token-label")?),
        pin,
    );
    let hsm = Hsm::open(config)?;
    let token = hsm.token();
    println!(
        "== opened token {:?} ({} {}, serial {})",
        token.label, token.manufacturer, token.model, token.serial
    );

    let mut session = hsm.session()?;
    let key = KeyLabel::for_version("demo-ca", 1)?;
    let info = session.generate_key_pair(&key, KeySpec::EcP256, Exportability::NonExportable)?;
    let public_key = info.public_key.ok_or("no public key")?;
    let fingerprint = sha2::Sha256::digest(public_key.spki_der());
    println!(
        "== generated {} key {key} inside the HSM (sensitive, never extractable, pair-wise tested)",
        info.spec
    );
    println!("   SPKI SHA-256 fingerprint: {}", hex(&fingerprint));

    let message = b"custody demo: a to-be-signed certificate would go here\n";
    let digest = sha2::Sha256::digest(message);
    let signature = session.sign(
        &key,
        SignAlgorithm::EcdsaP256Sha256,
        SignInput::Digest(&digest),
        EcdsaEncoding::Der,
    )?;
    println!(
        "== signed SHA-256 {} -> {}-byte DER ECDSA signature",
        hex(&digest[..8]),
        signature.len()
    );

    std::fs::write(out.join("message.txt"), message)?;
    std::fs::write(out.join("signature.der"), &signature)?;
    std::fs::write(out.join("public.pem"), public_key.to_pem()?)?;
    println!(
        "   wrote message.txt, signature.der, public.pem to {}",
        out.display()
    );
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
