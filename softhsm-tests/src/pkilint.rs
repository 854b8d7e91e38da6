//! pkilint, the PKI linter from PyPI (written and kept by DigiCert, not
//! here), in a virtual environment made once per target directory: the
//! external judge of the certificates custody's ceremonies make.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The pinned pkilint release.
pub const PKILINT_VERSION: &str = "0.13.3";

/// pkilint's command-line linters.
pub struct Pkilint {
    python: PathBuf,
}

/// What one lint found.
#[derive(Debug, Default)]
pub struct Findings {
    /// Findings of severity ERROR or FATAL: `code (SEVERITY) message`.
    pub errors: Vec<String>,
    /// Every finding, at any severity, in the same form.
    pub all: Vec<String>,
}

impl Pkilint {
    /// Makes (or reuses) the virtual environment under `cache`. `Err` says
    /// why pkilint cannot be had here (no `python3`, or pip cannot reach
    /// PyPI).
    pub fn new(cache: &Path) -> Result<Pkilint, String> {
        let venv = cache.join(format!("pkilint-venv-{PKILINT_VERSION}"));
        let python = venv.join("bin/python");
        if !python.exists() {
            crate::grpcio::make_venv(&venv, &[format!("pkilint=={PKILINT_VERSION}")])?;
        }
        Ok(Pkilint { python })
    }

    /// Lints the PEM certificate at `path` with
    /// `lint_cabf_serverauth_cert lint -t certificate_type` (the CA/Browser
    /// Forum TLS Baseline Requirements profile of that type, such as
    /// `ROOT-CA` or `EXTERNAL-UNCONSTRAINED-TLS-CA`).
    pub fn cabf_serverauth(&self, certificate_type: &str, path: &Path) -> Findings {
        self.run("lint_cabf_serverauth_cert", &["-t", certificate_type], path)
    }

    /// Lints the PEM CRL at `path` with `lint_crl lint -t crl_type -p
    /// profile`: `ARL` (a CA's CRL of CA certificates) or `CRL`, under the
    /// `BR` (CA/Browser Forum) or `PKIX` (RFC 5280) profile.
    pub fn crl(&self, crl_type: &str, profile: &str, path: &Path) -> Findings {
        self.run("lint_crl", &["-t", crl_type, "-p", profile], path)
    }

    fn run(&self, linter: &str, args: &[&str], path: &Path) -> Findings {
        // As a module: the venv was made under another name and renamed,
        // so its console scripts' #! lines point nowhere.
        let output = Command::new(&self.python)
            .args(["-m", &format!("pkilint.bin.{linter}"), "lint"])
            .args(args)
            .args(["-f", "JSON"])
            .arg(path)
            .output()
            .expect("run pkilint");
        let report: serde_json::Value =
            serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
                panic!(
                    "{linter} printed no JSON ({e}; {}):\n{}\n{}",
                    output.status,
                    String::from_utf8_lossy(&output.stdout),
                    String::from_utf8_lossy(&output.stderr)
                )
            });
        let mut findings = Findings::default();
        let results = report["results"].as_array().cloned().unwrap_or_default();
        for result in results {
            let descriptions = result["finding_descriptions"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            for finding in descriptions {
                let severity = finding["severity"].as_str().unwrap_or("?").to_string();
                let line = format!(
                    "{} ({severity}) {} @ {}",
                    finding["code"].as_str().unwrap_or("?"),
                    finding["message"].as_str().unwrap_or(""),
                    result["node_path"].as_str().unwrap_or("?"),
                );
                if severity == "ERROR" || severity == "FATAL" {
                    findings.errors.push(line.clone());
                }
                findings.all.push(line);
            }
        }
        findings
    }
}
