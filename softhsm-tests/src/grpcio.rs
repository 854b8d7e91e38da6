//! A grpc-core client for the tests that must see custodyd as clients that
//! are not tonic see it: Python's `grpcio` in a virtual environment made
//! once per target directory (pinned versions, from PyPI with pip; with
//! `grpcio-reflection`, Python's server reflection client), and
//! `custody.v1` stubs generated from `proto/` with `grpcio-tools` into the
//! test's own directory.
//!
//! grpc-core is stricter than tonic in ways that matter to callers (it
//! refuses trailers over its metadata limit with `RESOURCE_EXHAUSTED`, for
//! one), which is why a test drives it rather than a second tonic client.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The pinned `grpcio` and `grpcio-tools` release.
pub const GRPCIO_VERSION: &str = "1.85.1";

/// Python with grpcio, and the custody.v1 stubs.
pub struct GrpcCore {
    python: PathBuf,
    stubs: PathBuf,
}

impl GrpcCore {
    /// Makes (or reuses) the virtual environment under `cache`, and
    /// generates the stubs into `dir/stubs`. `Err` says why no grpc-core
    /// client can be had here (no `python3`, or pip cannot reach PyPI).
    pub fn new(cache: &Path, dir: &Path) -> Result<GrpcCore, String> {
        // "-2": with grpcio-reflection, for the reflection test.
        let venv = cache.join(format!("grpcio-venv-{GRPCIO_VERSION}-2"));
        let python = venv.join("bin/python");
        if !python.exists() {
            make_venv(
                &venv,
                &[
                    format!("grpcio=={GRPCIO_VERSION}"),
                    format!("grpcio-tools=={GRPCIO_VERSION}"),
                    format!("grpcio-reflection=={GRPCIO_VERSION}"),
                ],
            )?;
        }
        let stubs = dir.join("stubs");
        std::fs::create_dir_all(&stubs).map_err(|e| e.to_string())?;
        let proto = Path::new(env!("CARGO_MANIFEST_DIR")).join("../proto");
        let mut generate = Command::new(&python);
        generate
            .args(["-m", "grpc_tools.protoc", "-I"])
            .arg(&proto)
            .arg(format!("--python_out={}", stubs.display()))
            .arg(format!("--grpc_python_out={}", stubs.display()));
        for file in std::fs::read_dir(proto.join("custody/v1")).map_err(|e| e.to_string())? {
            let file = file.map_err(|e| e.to_string())?.path();
            generate.arg(file.strip_prefix(&proto).map_err(|e| e.to_string())?);
        }
        let output = generate.output().map_err(|e| e.to_string())?;
        crate::assert_success("grpc_tools.protoc", &output);
        Ok(GrpcCore { python, stubs })
    }

    /// Runs a Python `script` (its text) with the stubs importable, and
    /// `args` after it.
    pub fn run(&self, script: &str, args: &[&str]) -> Output {
        let path = self.stubs.join("client.py");
        std::fs::write(&path, script).expect("write the Python client");
        Command::new(&self.python)
            .arg(&path)
            .args(args)
            .env("PYTHONPATH", &self.stubs)
            .output()
            .expect("run Python")
    }
}

/// A new virtual environment at `venv` with the pinned `packages` (pip
/// requirement specifiers), made beside it and renamed into place, so that
/// an interrupted install never leaves a half-made one to be reused.
pub(crate) fn make_venv(venv: &Path, packages: &[String]) -> Result<(), String> {
    let parent = venv.parent().ok_or("no parent directory")?;
    std::fs::create_dir_all(parent).map_err(|e| e.to_string())?;
    let building = parent.join(format!(
        "{}.building-{}",
        venv.file_name().and_then(|n| n.to_str()).unwrap_or("venv"),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&building);
    let made = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&building)
        .output()
        .map_err(|e| format!("no python3: {e}"))?;
    if !made.status.success() {
        return Err(format!(
            "python3 -m venv failed: {}",
            String::from_utf8_lossy(&made.stderr)
        ));
    }
    let installed = Command::new(building.join("bin/pip"))
        .args(["install", "--quiet", "--disable-pip-version-check"])
        .args(packages)
        .output()
        .map_err(|e| format!("pip: {e}"))?;
    if !installed.status.success() {
        let _ = std::fs::remove_dir_all(&building);
        return Err(format!(
            "pip could not install {}: {}",
            packages.join(" "),
            String::from_utf8_lossy(&installed.stderr)
        ));
    }
    match std::fs::rename(&building, venv) {
        Ok(()) => Ok(()),
        // Another test made it meanwhile: use that one.
        Err(_) if venv.join("bin/python").exists() => {
            let _ = std::fs::remove_dir_all(&building);
            Ok(())
        }
        Err(e) => Err(e.to_string()),
    }
}
