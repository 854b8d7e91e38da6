//! `custodyctl dev-pki`: a development CA with server and client
//! certificates for every development identity, made offline.

use std::path::PathBuf;

use clap::Args as ClapArgs;

#[derive(ClapArgs)]
pub(crate) struct DevPkiArgs {
    /// Directory to write them to.
    #[arg(long)]
    out: PathBuf,
    /// Host names or addresses for the server certificate.
    #[arg(long = "host", default_values = ["localhost", "127.0.0.1"])]
    hosts: Vec<String>,
}

pub(crate) fn run(args: DevPkiArgs) -> Result<(), String> {
    let hosts: Vec<&str> = args.hosts.iter().map(String::as_str).collect();
    custody_daemon::devpki::write_dev_pki(&args.out, &hosts).map_err(|e| e.to_string())?;
    outln!(
        "wrote a dev CA, server certificate, CRL and client certificates to {}",
        args.out.display()
    );
    for (principal, roles) in custody_daemon::devpki::DEV_IDENTITIES {
        let roles: Vec<&str> = roles.iter().map(|r| r.as_str()).collect();
        outln!("  {principal}.pem  {}", roles.join(", "));
    }
    Ok(())
}
