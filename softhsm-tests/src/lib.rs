//! Test fixtures for custody on a real SoftHSM2 token.
//!
//! **One process, one token.** SoftHSM2 reads `SOFTHSM2_CONF` once, at
//! `C_Initialize`, and a process does not see tokens that others create later.
//! So every test made with [`token_test!`] re-runs itself in a child process
//! whose environment points at a token directory of its own, made fresh in a
//! temp dir. This works the same under `cargo test` (threads) and `cargo
//! nextest` (a process per test), needs no `unsafe` `set_var`, and lets tests
//! run in parallel without sharing a token.
//!
//! The module path comes from `SOFTHSM2_MODULE`, defaulting to Debian's.

#![forbid(unsafe_code)]

pub mod audit_files;
pub mod ceremony;
pub mod etcd;
pub mod grpcio;
pub mod pkcs11_module;
pub mod pkilint;
pub mod process;
pub mod replicas;
pub mod service;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use hsm_shim::{Hsm, HsmConfig, PublicKey, SecretString, SignAlgorithm, SignInput, TokenSelector};

/// Where Debian's `softhsm2` package puts the module.
pub const DEFAULT_MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";

const ISOLATED_TEST: &str = "CUSTODY_ISOLATED_TEST";
const TOKEN_DIR: &str = "CUSTODY_TEST_TOKEN_DIR";
const TOKEN_LABEL: &str = "custody-test";
const USER_PIN: &str = "4711-user";
const SO_PIN: &str = "0815-so";

/// The PKCS#11 module under test.
pub fn module_path() -> PathBuf {
    std::env::var_os("SOFTHSM2_MODULE").map_or_else(|| PathBuf::from(DEFAULT_MODULE), PathBuf::from)
}

/// A SoftHSM2 token made for one test (or one benchmark run).
#[derive(Debug, Clone)]
pub struct TestToken {
    dir: PathBuf,
}

impl TestToken {
    /// Makes a token directory, a `softhsm2.conf` pointing at it, and an
    /// initialised token in it, with `softhsm2-util`.
    pub fn create(dir: &Path) -> TestToken {
        let token = TestToken {
            dir: dir.to_path_buf(),
        };
        let tokens = dir.join("tokens");
        std::fs::create_dir_all(&tokens).expect("create token dir");
        std::fs::write(
            token.conf(),
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n",
                tokens.display()
            ),
        )
        .expect("write softhsm2.conf");
        std::fs::write(token.pin_file(), USER_PIN).expect("write PIN file");
        let output = Command::new("softhsm2-util")
            .env("SOFTHSM2_CONF", token.conf())
            .args(["--init-token", "--free", "--label", TOKEN_LABEL])
            .args(["--so-pin", SO_PIN, "--pin", USER_PIN])
            .output()
            .expect("run softhsm2-util (is the softhsm2 package installed?)");
        assert_success("softhsm2-util --init-token", &output);
        token
    }

    /// Throws away every token of this directory (the main one and those
    /// [`Self::add_token`] made) and initialises the main one again: for a
    /// test whose SoftHSM2 tore its own token file (SoftHSM2 rewrites it in
    /// place, so a SIGKILL in the middle loses the token).
    pub fn reinitialise(&self) {
        let tokens = self.dir.join("tokens");
        std::fs::remove_dir_all(&tokens).expect("remove token dir");
        for entry in std::fs::read_dir(&self.dir).expect("read token dir") {
            let path = entry.expect("token dir entry").path();
            if path.extension().is_some_and(|e| e == "token") {
                std::fs::remove_file(path).expect("remove token marker");
            }
        }
        Self::create(&self.dir);
    }

    /// The `softhsm2.conf` of this token; give it to child processes as
    /// `SOFTHSM2_CONF`.
    pub fn conf(&self) -> PathBuf {
        self.dir.join("softhsm2.conf")
    }

    /// A file holding the user PIN.
    pub fn pin_file(&self) -> PathBuf {
        self.dir.join("user.pin")
    }

    /// The token label.
    pub fn label(&self) -> &'static str {
        TOKEN_LABEL
    }

    /// The user PIN (test tokens only).
    pub fn user_pin(&self) -> &'static str {
        USER_PIN
    }

    /// A file holding the security officer PIN (test tokens only).
    pub fn so_pin_file(&self) -> PathBuf {
        let path = self.dir.join("so.pin");
        if !path.exists() {
            std::fs::write(&path, SO_PIN).expect("write SO PIN file");
        }
        path
    }

    /// Initialises a second token labelled `label` in this token's directory
    /// (same PINs), once; for DR drills' scratch token. Call it before the
    /// process opens the module: SoftHSM2 reads its slots at start.
    pub fn add_token(&self, label: &str) {
        let marker = self.dir.join(format!("{label}.token"));
        if marker.exists() {
            return;
        }
        let output = Command::new("softhsm2-util")
            .env("SOFTHSM2_CONF", self.conf())
            .args(["--init-token", "--free", "--label", label])
            .args(["--so-pin", SO_PIN, "--pin", USER_PIN])
            .output()
            .expect("run softhsm2-util");
        assert_success("softhsm2-util --init-token", &output);
        std::fs::write(marker, label).expect("write token marker");
    }

    /// The security officer PIN (test tokens only).
    pub fn so_pin(&self) -> SecretString {
        SecretString::from(SO_PIN)
    }

    /// A scratch directory for the test's own files.
    pub fn scratch(&self) -> PathBuf {
        let scratch = self.dir.join("scratch");
        std::fs::create_dir_all(&scratch).expect("create scratch dir");
        scratch
    }

    /// The config to open this token with `workers` worker threads.
    pub fn config(&self, workers: usize) -> HsmConfig {
        let mut config = HsmConfig::new(
            module_path(),
            TokenSelector::Label(TOKEN_LABEL.into()),
            SecretString::from(USER_PIN),
        );
        config.workers = workers;
        config
    }

    /// Opens this token with the default worker count.
    pub fn open(&self) -> Hsm {
        Hsm::open(self.config(HsmConfig::DEFAULT_WORKERS)).expect("open the test token")
    }

    /// `pkcs11-tool` on this token, logged in as the user: another process
    /// acting on the same token, as an operator or an attacker would.
    pub fn pkcs11_tool(&self) -> Command {
        let mut command = Command::new("pkcs11-tool");
        command
            .env("SOFTHSM2_CONF", self.conf())
            .arg("--module")
            .arg(module_path())
            .args(["--token-label", TOKEN_LABEL, "--login", "--pin", USER_PIN]);
        command
    }
}

/// Runs `body` on a fresh token in a child process of its own; see the crate
/// docs. `module_path` and `name` identify the test (use [`token_test!`]).
pub fn run_isolated(module_path: &str, name: &str, body: impl FnOnce(&TestToken)) {
    // libtest names a test by its path inside the test crate, without the
    // crate's own name.
    let test_name = module_path
        .split("::")
        .skip(1)
        .chain(std::iter::once(name))
        .collect::<Vec<_>>()
        .join("::");
    // The parent runs this test, so the child must too, even if it is
    // `#[ignore]`d (the parent was started with `--run-ignored`).
    let child_args = [
        &test_name,
        "--exact",
        "--nocapture",
        "--test-threads=1",
        "--include-ignored",
    ];
    let Some(output) = with_fresh_token(&test_name, &child_args, Some(test_deadline()), body)
    else {
        return;
    };
    // Through the harness's capture, so the child's output shows only when the
    // test fails, as any test's would.
    #[expect(clippy::print_stdout, reason = "forwards the child's test output")]
    {
        print!("{}", String::from_utf8_lossy(&output.stdout));
    }
    eprint!("{}", String::from_utf8_lossy(&output.stderr));
    let ran = String::from_utf8_lossy(&output.stdout).contains("1 passed");
    assert!(
        output.status.success() && ran,
        "test {test_name} failed in its token process ({}; see its output above)",
        output.status
    );
}

/// The re-run behind [`run_isolated`], for any program: in the parent, makes a
/// fresh token and re-runs the current executable with `child_args` and the
/// token's environment, returning the child's output; in that child (told
/// apart by `id`), runs `body` and returns `None`.
///
/// A child still running after `deadline` is killed and the parent panics
/// with what each of its threads was waiting in ([`StuckChild`]): a test
/// that hangs fails on its own, saying where, instead of holding the run.
/// The child writes to files, not pipes, so that a process it started and
/// left behind cannot keep the parent reading.
pub fn with_fresh_token(
    id: &str,
    child_args: &[&str],
    deadline: Option<Duration>,
    body: impl FnOnce(&TestToken),
) -> Option<Output> {
    if std::env::var(ISOLATED_TEST).as_deref() == Ok(id) {
        let dir = std::env::var_os(TOKEN_DIR).expect("token dir of the isolated run");
        body(&TestToken {
            dir: PathBuf::from(dir),
        });
        return None;
    }
    let dir = tempfile::Builder::new()
        .prefix("custody-token-")
        .tempdir()
        .expect("temp dir");
    let token = TestToken::create(dir.path());
    let stdout_path = dir.path().join("child.stdout");
    let stderr_path = dir.path().join("child.stderr");
    let create = |path: &Path| std::fs::File::create(path).expect("the child's output file");
    let mut child = Command::new(std::env::current_exe().expect("own executable path"))
        .args(child_args)
        .env(ISOLATED_TEST, id)
        .env(TOKEN_DIR, dir.path())
        .env("SOFTHSM2_CONF", token.conf())
        .env("CUSTODY_TEST_USER_PIN", USER_PIN)
        // Where a test that loads custody's PKCS#11 module writes its config
        // (src/pkcs11_module.rs); the module reads it at C_Initialize.
        .env(
            pkcs11_module::CONFIG_ENV,
            dir.path().join(pkcs11_module::CONFIG_FILE),
        )
        .stdin(Stdio::null())
        .stdout(create(&stdout_path))
        .stderr(create(&stderr_path))
        .spawn()
        .expect("re-run in a child process");
    let read = |path: &Path| std::fs::read(path).unwrap_or_default();
    let status = match deadline {
        None => child.wait().expect("wait for the child process"),
        Some(deadline) => match wait_until(&mut child, Instant::now() + deadline) {
            Some(status) => status,
            None => {
                let stuck = StuckChild::inspect(child.id());
                // Its own children too (a custodyd, etcd members), found
                // before it dies and they move to another parent.
                let family = descendants(child.id());
                let _ = child.kill();
                let _ = child.wait();
                if !family.is_empty() {
                    let _ = Command::new("kill").arg("-KILL").args(&family).status();
                }
                panic!(
                    "{id} was still running after {deadline:?} and was killed.\n\
                     Its threads, and what each waited in:\n{stuck}\n\
                     Its output:\n{}{}",
                    String::from_utf8_lossy(&read(&stdout_path)),
                    String::from_utf8_lossy(&read(&stderr_path)),
                );
            }
        },
    };
    Some(Output {
        status,
        stdout: read(&stdout_path),
        stderr: read(&stderr_path),
    })
}

/// How long a token test may run: `CUSTODY_TEST_DEADLINE_SECS`, or eight
/// minutes (the slowest test takes about two on a loaded two-core machine).
fn test_deadline() -> Duration {
    let secs = std::env::var("CUSTODY_TEST_DEADLINE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(480);
    Duration::from_secs(secs)
}

/// The processes below `pid`, from `/proc` (children before theirs).
fn descendants(pid: u32) -> Vec<String> {
    let mut found = Vec::new();
    let mut next = vec![pid.to_string()];
    while let Some(parent) = next.pop() {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{parent}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            let children =
                std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
            for child in children.split_whitespace() {
                found.push(child.to_string());
                next.push(child.to_string());
            }
        }
    }
    found
}

/// The child's exit status, or `None` if it is still running at `until`.
fn wait_until(child: &mut Child, until: Instant) -> Option<ExitStatus> {
    loop {
        if let Some(status) = child.try_wait().expect("wait for the child process") {
            return Some(status);
        }
        if Instant::now() >= until {
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// What each thread of a stuck process was doing: from `/proc`, its name,
/// its kernel wait channel and, where readable (root), its kernel stack;
/// then, if `gdb` is installed, every thread's own stack, which names the
/// lock or channel a `futex` wait is on.
struct StuckChild(String);

impl StuckChild {
    fn inspect(pid: u32) -> StuckChild {
        let tasks = PathBuf::from(format!("/proc/{pid}/task"));
        let Ok(entries) = std::fs::read_dir(&tasks) else {
            return StuckChild(format!("({} is unreadable)", tasks.display()));
        };
        let mut report = String::new();
        for task in entries.flatten() {
            let read = |name: &str| {
                std::fs::read_to_string(task.path().join(name))
                    .map(|s| s.trim().to_string())
                    .unwrap_or_default()
            };
            let state = stat_state(&read("stat")).unwrap_or_default().to_string();
            report.push_str(&format!(
                "  {} {:?} state {state} wchan {}\n",
                task.file_name().to_string_lossy(),
                read("comm"),
                read("wchan"),
            ));
            for frame in read("stack").lines().take(12) {
                report.push_str(&format!("      {frame}\n"));
            }
        }
        // Bounded: gdb itself must not become the hang.
        let pid = pid.to_string();
        let gdb = [
            "-k",
            "5",
            "60",
            "gdb",
            "-p",
            &pid,
            "-batch",
            "-nx",
            "-ex",
            "thread apply all bt 40",
        ];
        match Command::new("timeout")
            .args(gdb)
            .stdin(Stdio::null())
            .output()
        {
            Ok(out) => {
                report.push_str("Their stacks (gdb):\n");
                report.push_str(&String::from_utf8_lossy(&out.stdout));
                report.push_str(&String::from_utf8_lossy(&out.stderr));
            }
            Err(error) => report.push_str(&format!("(no stacks: gdb could not run: {error})\n")),
        }
        StuckChild(report)
    }
}

impl std::fmt::Display for StuckChild {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// How long each measurement of a benchmark runs, in seconds:
/// `BENCH_SECONDS`, or `default`.
pub fn bench_seconds(default: f64) -> f64 {
    std::env::var("BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// For a benchmark: logs the way custodyd does (`RUST_LOG`, default
/// `info`: a line per request), to an anonymous file, so that its figures
/// include the request log's cost. Keep the guard until the end.
pub fn log_like_custodyd() -> custody_daemon::run::LogGuard {
    let file = tempfile::tempfile().expect("the benchmark's log file");
    custody_daemon::run::init_logging_to(file, false)
}

/// The state field of a `/proc/.../stat` line (`R`, `S`, `T`, `Z`, …): the
/// field after the command name, which is in parentheses and may hold
/// spaces and parentheses itself.
fn stat_state(stat: &str) -> Option<&str> {
    stat.rsplit_once(") ")
        .and_then(|(_, rest)| rest.split(' ').next())
}

/// Process `pid`'s state letter (`T` stopped by a signal, `Z` a zombie,
/// …), or `None` if it is gone.
pub fn process_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat_state(&stat).and_then(|state| state.chars().next())
}

/// The `main` of a benchmark: runs `body` on a fresh token in a child
/// process, forwards its report, and exits with its status.
pub fn run_bench(id: &str, body: impl FnOnce(&TestToken)) {
    // `cargo bench` passes `--bench`; the child needs no arguments.
    if let Some(output) = with_fresh_token(id, &[], None, body) {
        #[expect(clippy::print_stdout, reason = "forwards the benchmark's report")]
        {
            print!("{}", String::from_utf8_lossy(&output.stdout));
        }
        eprint!("{}", String::from_utf8_lossy(&output.stderr));
        std::process::exit(output.status.code().unwrap_or(1));
    }
}

/// Declares a test that runs on a fresh SoftHSM2 token of its own:
///
/// ```ignore
/// token_test!(fn signs(token) { let hsm = token.open(); /* ... */ });
/// ```
#[macro_export]
macro_rules! token_test {
    ($(#[$meta:meta])* fn $name:ident($token:ident) $body:block) => {
        $(#[$meta])*
        #[test]
        fn $name() {
            $crate::run_isolated(module_path!(), stringify!($name), |$token: &$crate::TestToken| $body);
        }
    };
}

/// Copies directory `from` into `to`, recursively: a data directory
/// backed up, or put back from its copy, while custodyd is stopped.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create the copy's directory");
    for entry in std::fs::read_dir(from).expect("read the directory") {
        let entry = entry.expect("directory entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("file type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy a file");
        }
    }
}

/// Panics with the command's output unless it succeeded.
pub fn assert_success(what: &str, output: &Output) {
    assert!(
        output.status.success(),
        "{what} failed ({}):\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Verifies a signature with `openssl`, independently of the HSM. ECDSA
/// signatures must be DER (what X.509 tooling expects).
pub fn openssl_verifies(
    scratch: &Path,
    public_key: &PublicKey,
    algorithm: SignAlgorithm,
    input: SignInput<'_>,
    signature: &[u8],
) -> bool {
    openssl_verifies_pem(
        scratch,
        &public_key.to_pem().expect("PEM"),
        algorithm,
        input,
        signature,
    )
}

/// [`openssl_verifies`] with the public key as SubjectPublicKeyInfo PEM.
pub fn openssl_verifies_pem(
    scratch: &Path,
    public_key_pem: &str,
    algorithm: SignAlgorithm,
    input: SignInput<'_>,
    signature: &[u8],
) -> bool {
    let dir = tempfile::tempdir_in(scratch).expect("temp dir");
    let key = dir.path().join("public.pem");
    let data = dir.path().join("data");
    let sig = dir.path().join("signature");
    std::fs::write(&key, public_key_pem).expect("write key");
    std::fs::write(&sig, signature).expect("write signature");
    let (bytes, is_digest) = match input {
        SignInput::Digest(d) => (d, true),
        SignInput::Message(m) => (m, false),
    };
    std::fs::write(&data, bytes).expect("write data");

    let mut command = Command::new("openssl");
    let hash_name = algorithm.hash().map(|h| match h {
        hsm_shim::HashAlg::Sha256 => "sha256",
        hsm_shim::HashAlg::Sha384 => "sha384",
        hsm_shim::HashAlg::Sha512 => "sha512",
    });
    let pss = matches!(algorithm, SignAlgorithm::RsaPss(_));
    if is_digest || algorithm == SignAlgorithm::Ed25519 {
        command
            .args(["pkeyutl", "-verify", "-pubin", "-inkey"])
            .arg(&key);
        command.arg("-in").arg(&data).arg("-sigfile").arg(&sig);
        if algorithm == SignAlgorithm::Ed25519 {
            command.arg("-rawin");
        }
        if let (Some(hash), false) = (hash_name, algorithm.is_ecdsa()) {
            command.args(["-pkeyopt", &format!("digest:{hash}")]);
            if pss {
                command.args([
                    "-pkeyopt",
                    "rsa_padding_mode:pss",
                    "-pkeyopt",
                    "rsa_pss_saltlen:digest",
                ]);
            }
        }
    } else {
        let hash = hash_name.expect("message forms other than Ed25519 are hashed");
        command
            .args(["dgst", &format!("-{hash}"), "-verify"])
            .arg(&key);
        command.arg("-signature").arg(&sig);
        if pss {
            command.args([
                "-sigopt",
                "rsa_padding_mode:pss",
                "-sigopt",
                "rsa_pss_saltlen:digest",
            ]);
        }
        command.arg(&data);
    }
    let output = command.output().expect("run openssl");
    output.status.success()
}

/// A fresh EC P-256 private key made by openssl (`genpkey`), PEM.
pub fn openssl_p256_key() -> Vec<u8> {
    openssl(
        &[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ],
        b"",
    )
}

/// Runs `openssl` with `args`, feeding `input`, and returns its stdout.
pub fn openssl(args: &[&str], input: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut child = Command::new("openssl")
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run openssl");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input)
        .expect("write to openssl");
    let output = child.wait_with_output().expect("openssl output");
    assert_success(&format!("openssl {}", args.join(" ")), &output);
    output.stdout
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_test_that_hangs_is_killed_at_its_deadline_and_says_where_it_waited() {
        const NAME: &str =
            "tests::a_token_test_that_hangs_is_killed_at_its_deadline_and_says_where_it_waited";
        let args = [NAME, "--exact", "--nocapture", "--test-threads=1"];
        let deadline = Duration::from_secs(3);
        let outcome = std::panic::catch_unwind(|| {
            with_fresh_token(NAME, &args, Some(deadline), |_| {
                // A process of its own, which must not outlive it (killed,
                // never waited for: the child itself never returns).
                #[expect(clippy::zombie_processes, reason = "the hang under test")]
                let sleeper = Command::new("sleep").arg("600").spawn().unwrap();
                println!("the child began; its sleeper is {}.", sleeper.id());
                // A thread that never finishes: the hang the deadline is for.
                loop {
                    std::thread::sleep(Duration::from_secs(60));
                }
            })
        });
        // In the child, the body never returns; here, the parent reports.
        let panic = outcome.expect_err("a hung child is reported, not waited for");
        let message = panic
            .downcast_ref::<String>()
            .expect("a formatted panic message");
        assert!(
            message.contains("was still running after 3s and was killed"),
            "{message}"
        );
        assert!(
            message.contains("the child began"),
            "the child's output is shown: {message}"
        );
        // Its own child was killed with it (bounded wait for the kill to
        // land; a zombie no one reaps has ended too).
        let sleeper = message
            .split("its sleeper is ")
            .nth(1)
            .and_then(|rest| rest.split('.').next())
            .expect("the sleeper's pid in the output");
        let ended = (0..500).any(|_| {
            let ended = matches!(
                process_state(sleeper.parse().expect("a pid")),
                None | Some('Z' | 'X')
            );
            if !ended {
                std::thread::sleep(Duration::from_millis(10));
            }
            ended
        });
        assert!(ended, "the child's own process {sleeper} outlived it");
        // The listing names the sleeping thread.
        assert!(message.contains(" state S "), "{message}");
        // With gdb (install-deps.sh installs it), its own stack too.
        if Command::new("gdb").arg("--version").output().is_ok() {
            assert!(
                message.contains("softhsm_tests::with_fresh_token"),
                "{message}"
            );
        }
    }
}
