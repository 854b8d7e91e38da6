//! `custodyctl sign|verify`: sign a digest or a file with a key in the HSM,
//! and verify a signature with the HSM's copy of the public key. Also the
//! digest given as hex with its hash function, which `request sign` shares.

use std::path::PathBuf;

use clap::{Args as ClapArgs, Subcommand, ValueEnum};
use custody_proto::v1::signing_service_client::SigningServiceClient;
use custody_proto::v1::{
    Digest, SignRequest, SignatureEncoding, VerifyRequest, digest, sign_request, verify_request,
};

use crate::Connection;
use crate::shared::{channel, check_crc, hex_arg, key_name, read_bytes, shown, status, write_file};

#[derive(Subcommand)]
pub(crate) enum SigningCommand {
    /// Sign a digest or a file.
    Sign(SignArgs),
    /// Verify a signature with the HSM's copy of the public key.
    Verify(VerifyArgs),
}

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum HashArg {
    Sha256,
    Sha384,
    Sha512,
}

#[derive(Clone, Copy, ValueEnum)]
enum FormatArg {
    Der,
    Raw,
}

#[derive(ClapArgs)]
struct InputArgs {
    /// keys/{key_id}[/versions/{version}] or just the key id.
    name: String,
    /// A digest, hex.
    #[arg(long, conflicts_with = "file")]
    digest: Option<String>,
    /// The digest's hash function.
    #[arg(long, value_enum, default_value = "sha256")]
    hash: HashArg,
    /// A file to sign as a message (the service hashes it, or signs it whole
    /// for Ed25519).
    #[arg(long)]
    file: Option<PathBuf>,
    /// Signature encoding (ECDSA only).
    #[arg(long, value_enum, default_value = "der")]
    format: FormatArg,
}

#[derive(ClapArgs)]
pub(crate) struct SignArgs {
    #[command(flatten)]
    input: InputArgs,
    /// Write the signature (binary) here; otherwise print it as hex.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(ClapArgs)]
pub(crate) struct VerifyArgs {
    #[command(flatten)]
    input: InputArgs,
    /// The signature file (binary).
    #[arg(long)]
    signature: PathBuf,
}

pub(crate) async fn run(connection: &Connection, command: SigningCommand) -> Result<(), String> {
    match command {
        SigningCommand::Sign(args) => sign(connection, args).await,
        SigningCommand::Verify(args) => verify(connection, args).await,
    }
}

async fn sign(connection: &Connection, args: SignArgs) -> Result<(), String> {
    let (input, _) = input_of(&args.input)?;
    let mut signing = SigningServiceClient::new(channel(connection).await?);
    let crc = match &input {
        Some(sign_request::Input::Digest(d)) => match &d.digest {
            Some(
                digest::Digest::Sha256(b) | digest::Digest::Sha384(b) | digest::Digest::Sha512(b),
            ) => crc32c::crc32c(b),
            None => 0,
        },
        Some(sign_request::Input::Data(d)) => crc32c::crc32c(d),
        None => 0,
    };
    let response = signing
        .sign(SignRequest {
            name: key_name(&args.input.name),
            input,
            encoding: encoding(args.input.format),
            input_crc32c: Some(crc),
            request_id: 0,
        })
        .await
        .map_err(status)?
        .into_inner();
    check_crc(&response.signature, response.signature_crc32c, "signature")?;
    match args.out {
        Some(path) => {
            write_file(&path, &response.signature)?;
            outln!(
                "signed with {}; {}-byte signature written to {}",
                shown(&response.name),
                response.signature.len(),
                path.display()
            );
        }
        None => outln!(
            "{}  {}",
            shown(&response.name),
            hex::encode(&response.signature)
        ),
    }
    Ok(())
}

async fn verify(connection: &Connection, args: VerifyArgs) -> Result<(), String> {
    let (_, input) = input_of(&args.input)?;
    let signature = read_bytes(&args.signature)?;
    let mut signing = SigningServiceClient::new(channel(connection).await?);
    let response = signing
        .verify(VerifyRequest {
            name: key_name(&args.input.name),
            input,
            signature,
            encoding: encoding(args.input.format),
        })
        .await
        .map_err(status)?
        .into_inner();
    if response.valid {
        outln!("valid signature by {}", shown(&response.name));
        Ok(())
    } else {
        Err(format!("INVALID signature for {}", shown(&response.name)))
    }
}

/// A digest given as hex on the command line, for `--digest`.
pub(crate) fn digest_of(hex_digest: &str, hash: HashArg) -> Result<Digest, String> {
    let bytes = hex_arg("--digest", hex_digest)?;
    Ok(Digest {
        digest: Some(match hash {
            HashArg::Sha256 => digest::Digest::Sha256(bytes),
            HashArg::Sha384 => digest::Digest::Sha384(bytes),
            HashArg::Sha512 => digest::Digest::Sha512(bytes),
        }),
    })
}

fn input_of(
    args: &InputArgs,
) -> Result<(Option<sign_request::Input>, Option<verify_request::Input>), String> {
    match (&args.digest, &args.file) {
        (Some(hex_digest), None) => {
            let digest = digest_of(hex_digest, args.hash)?;
            Ok((
                Some(sign_request::Input::Digest(digest.clone())),
                Some(verify_request::Input::Digest(digest)),
            ))
        }
        (None, Some(file)) => {
            let data = read_bytes(file)?;
            Ok((
                Some(sign_request::Input::Data(data.clone())),
                Some(verify_request::Input::Data(data)),
            ))
        }
        _ => Err("give --digest HEX or --file PATH".into()),
    }
}

fn encoding(format: FormatArg) -> i32 {
    match format {
        FormatArg::Der => SignatureEncoding::Der as i32,
        FormatArg::Raw => SignatureEncoding::Raw as i32,
    }
}
