//! custodyd as a process for the process tests: a PKI and a config written
//! for it, the daemon started (or SIGKILLed) and reached over mTLS, its audit
//! log read back.

#![allow(
    clippy::unwrap_used,
    reason = "a test fixture fails by panicking on the unexpected"
)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use custody_core::identity::Role;
use custody_daemon::devpki::{Ca, Issued, Validity};
use custody_proto::v1::ListKeysRequest;
use custody_proto::v1::key_service_client::KeyServiceClient;
use tonic::transport::Channel;

use crate::TestToken;

/// The test's CA and the directory of its files.
pub struct Pki {
    /// The CA of servers and clients.
    pub ca: Ca,
    /// Certificates, keys and the config file.
    pub dir: PathBuf,
}

impl Pki {
    /// A client certificate for `principal` with `roles`.
    pub fn client(&self, principal: &str, roles: &[Role]) -> Issued {
        self.ca
            .issue_client(principal, roles, Validity::days(1))
            .unwrap()
    }
}

/// Writes a PKI and a config for a daemon on `port`; returns the config path.
pub fn prepare(token: &TestToken, port: u16) -> (Pki, PathBuf) {
    prepare_with(token, port, "")
}

/// [`prepare`], with `extra` appended to the config (its own sections).
pub fn prepare_with(token: &TestToken, port: u16, extra: &str) -> (Pki, PathBuf) {
    let dir = token.scratch().join("daemon");
    std::fs::create_dir_all(&dir).unwrap();
    let ca = Ca::new("process test CA").unwrap();
    let server = ca.issue_server(&["localhost"]).unwrap();
    let write = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    write("ca.pem", ca.cert_pem());
    write("crl.pem", &ca.crl(&[]).unwrap());
    write("server.pem", &server.cert_pem);
    write("server.key", &server.key_pem);
    let config = format!(
        r#"listen = "127.0.0.1:{port}"
data_dir = "{dir}/data"
[hsm]
module = "{module}"
token_label = "{label}"
pin_file = "{pin}"
[tls]
cert = "{dir}/server.pem"
key = "{dir}/server.key"
client_ca = "{dir}/ca.pem"
crls = ["{dir}/crl.pem"]
{extra}"#,
        dir = dir.display(),
        module = crate::module_path().display(),
        label = token.label(),
        pin = token.pin_file().display(),
    );
    let path = write("custodyd.toml", &config);
    (Pki { ca, dir }, path)
}

/// Replica `id`'s config: `first`'s (as [`prepare`] wrote it) with its
/// own port, data directory and `extra` sections (a `[store]` section:
/// [`crate::etcd::Cluster::store_section`]).
pub fn replica_config(first: &Path, port: u16, id: &str, extra: &str) -> PathBuf {
    let text = std::fs::read_to_string(first).unwrap();
    let listen = text.lines().next().unwrap();
    let data_dir = text.lines().nth(1).unwrap();
    let text = text
        .replace(listen, &format!("listen = \"127.0.0.1:{port}\""))
        .replace(
            data_dir,
            &data_dir.replace("/data\"", &format!("/data-{id}\"")),
        );
    let path = first.with_file_name(format!("custodyd-{id}.toml"));
    std::fs::write(&path, format!("{text}\n{extra}")).unwrap();
    path
}

/// A loopback port free at the time of asking.
pub fn free_port() -> u16 {
    free_ports(1)[0]
}

/// `count` distinct loopback ports free at the time of asking, taken below
/// the kernel's ephemeral range: a port from that range can become the
/// local port of any outgoing connection on the machine while its server is
/// down, and a replica restarted on its own port under load found it taken.
/// A random start per call keeps concurrent test processes apart; each port
/// is checked by binding it.
pub fn free_ports(count: usize) -> Vec<u16> {
    use std::hash::{BuildHasher, Hasher};
    const LOWEST: u32 = 10_000;
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32_768);
    let span = ephemeral_low.saturating_sub(LOWEST);
    let mut listeners = Vec::with_capacity(count);
    if span >= 1_000 {
        let start = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        for step in 0..span {
            if listeners.len() == count {
                break;
            }
            let port = LOWEST + ((start % u64::from(span)) as u32 + step) % span;
            let port = u16::try_from(port).expect("below the ephemeral range");
            if let Ok(listener) = std::net::TcpListener::bind(("127.0.0.1", port)) {
                listeners.push(listener);
            }
        }
    }
    // No room below the ephemeral range: the kernel picks.
    while listeners.len() < count {
        listeners.push(std::net::TcpListener::bind("127.0.0.1:0").expect("bind a loopback port"));
    }
    listeners
        .iter()
        .map(|listener| listener.local_addr().expect("local address").port())
        .collect()
}

/// A custodyd process, killed when dropped: a failing test must not leave a
/// daemon holding the test's output pipes (the run would hang, not fail).
pub struct Daemon(pub Child);

impl std::ops::Deref for Daemon {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Daemon {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Daemon {
    /// Sends SIGTERM and waits for custodyd to exit (at most 60 s, then the
    /// test fails): its exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let sent = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status()
            .expect("run kill");
        assert!(sent.success(), "kill -TERM failed");
        for _ in 0..600 {
            if let Some(status) = self.0.try_wait().expect("wait for custodyd") {
                return status;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        panic!("custodyd did not exit within 60 s of SIGTERM");
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `custodyd` (the test's `custodyd-under-test` binary) on `config`.
pub fn spawn(custodyd: &str, config: &Path) -> Daemon {
    spawn_crashing_at(Command::new(custodyd), config, None)
}

/// Starts custodyd by `command` (the binary, or a program that runs it with
/// the arguments that follow); with `crash_at`, it SIGKILLs itself at that
/// crash point.
pub fn spawn_crashing_at(mut command: Command, config: &Path, crash_at: Option<&str>) -> Daemon {
    command
        .arg(config)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null());
    if let Some(point) = crash_at {
        command.env("CUSTODY_CRASH_AT", point);
    }
    Daemon(command.spawn().unwrap())
}

/// A channel to the daemon on `port` as `issued`.
pub async fn connect(pki: &Pki, port: u16, issued: &Issued) -> Result<Channel, String> {
    custody_daemon::client::connect(
        &format!("https://localhost:{port}"),
        pki.ca.cert_pem(),
        &issued.cert_pem,
        &issued.key_pem,
    )
    .await
}

/// Whether SoftHSM2 still lists an initialised token labelled `label`.
pub fn softhsm_lists_token(token: &TestToken, label: &str) -> bool {
    let shown = std::process::Command::new("softhsm2-util")
        .env("SOFTHSM2_CONF", token.conf())
        .arg("--show-slots")
        .output()
        .expect("softhsm2-util runs");
    String::from_utf8_lossy(&shown.stdout)
        .lines()
        .any(|line| line.trim_start().starts_with("Label:") && line.trim_end().ends_with(label))
}

/// Waits until the daemon answers (or panics after ten seconds).
pub async fn ready(pki: &Pki, port: u16, child: &mut Daemon) -> Channel {
    let operator = pki.client("operator", &[Role::Operator]);
    for _ in 0..200 {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("custodyd exited early: {status}");
        }
        if let Ok(channel) = connect(pki, port, &operator).await {
            if KeyServiceClient::new(channel.clone())
                .list_keys(ListKeysRequest::default())
                .await
                .is_ok()
            {
                return channel;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "custodyd did not come up; where its threads wait:\n{}",
        waits(child.id())
    );
}

/// Where each thread of process `pid` waits (its name and kernel wait
/// channel), and the file locks on the machine: what a start that never
/// answers is stuck on (another process's lock on the token's files, say).
fn waits(pid: u32) -> String {
    let mut text = String::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for task in tasks.flatten() {
            let read =
                |file: &str| std::fs::read_to_string(task.path().join(file)).unwrap_or_default();
            text.push_str(&format!(
                "{} {}\n",
                read("comm").trim(),
                read("wchan").trim()
            ));
        }
    }
    text.push_str("file locks (/proc/locks):\n");
    text.push_str(&std::fs::read_to_string("/proc/locks").unwrap_or_default());
    text
}

/// The audit log read through AuditService: each record's entry, and the
/// whole as export lines (what `custodyctl audit export` writes).
pub async fn audit_export(pki: &Pki, port: u16) -> (Vec<String>, String) {
    use custody_core::audit::{ExportLine, SignedHead};
    use custody_proto::v1::read_audit_response::Item;
    let auditor = connect(pki, port, &pki.client("auditor", &[Role::Auditor]))
        .await
        .unwrap();
    let mut stream = custody_proto::v1::audit_service_client::AuditServiceClient::new(auditor)
        .read_audit(custody_proto::v1::ReadAuditRequest { start_seq: 1 })
        .await
        .unwrap()
        .into_inner();
    let mut entries = Vec::new();
    let mut text = String::new();
    while let Some(item) = stream.message().await.unwrap() {
        let line = match item.item.unwrap() {
            Item::Record(r) => {
                let entry = String::from_utf8(r.entry).unwrap();
                entries.push(entry.clone());
                ExportLine::Record {
                    seq: r.seq,
                    entry,
                    hash: hex::encode(r.hash),
                }
            }
            Item::Head(h) => ExportLine::head(&SignedHead {
                seq: h.seq,
                hash: h.hash.try_into().unwrap(),
                time: h.time,
                signature: h.signature,
            }),
        };
        text.push_str(&serde_json::to_string(&line).unwrap());
        text.push('\n');
    }
    (entries, text)
}

/// Checks the chain of an export's records (what `audit_export` returns);
/// the first bad record, if any.
pub fn verify_export(text: &str) -> custody_core::audit::VerifyReport {
    use custody_core::audit::{ExportLine, Record, verify_records};
    verify_records(
        text.lines()
            .filter_map(|l| match serde_json::from_str(l).unwrap() {
                ExportLine::Record { seq, entry, hash } => Some(Ok(Record {
                    seq,
                    entry: entry.into_bytes(),
                    hash: hex::decode(hash).unwrap().try_into().unwrap(),
                })),
                ExportLine::Head { .. } => None,
            }),
        None,
    )
}

/// [`prepare`], plus three officers (alice, bob, carol; 2 of 3 for
/// administration), the SO PIN and a scratch token for ceremonies.
pub fn prepare_ceremonies(
    token: &TestToken,
    port: u16,
) -> (
    Pki,
    PathBuf,
    Vec<custody_core::dual_control::officer_key::OfficerKey>,
) {
    use custody_core::dual_control::officer_key::OfficerKey;
    token.add_token(crate::service::SCRATCH_TOKEN);
    let (pki, config) = prepare(token, port);
    let passphrase = hsm_shim::SecretString::from("process test passphrase");
    let mut genesis = String::from("required = 2\n");
    let mut keys = Vec::new();
    for name in ["alice", "bob", "carol"] {
        let (key, _) = OfficerKey::generate(name, &passphrase).unwrap();
        genesis.push_str(&format!(
            "[[officers]]\nid = \"{name}\"\nprincipal = \"{name}\"\npublic_key = \"{}\"\n",
            hex::encode(key.public_key())
        ));
        keys.push(key);
    }
    let genesis_path = pki.dir.join("officers.toml");
    std::fs::write(&genesis_path, genesis).unwrap();
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(&format!(
        "[dual_control]\ngenesis_file = \"{}\"\n[ceremony]\nso_pin_file = \"{}\"\nscratch_token_label = \"{}\"\nscratch_pin_file = \"{}\"\n",
        genesis_path.display(),
        token.so_pin_file().display(),
        crate::service::SCRATCH_TOKEN,
        token.pin_file().display(),
    ));
    std::fs::write(&config, text).unwrap();
    (pki, config, keys)
}

/// A channel per officer (alice, bob, carol).
pub async fn officer_channels(pki: &Pki, port: u16) -> std::collections::BTreeMap<String, Channel> {
    let mut channels = std::collections::BTreeMap::new();
    for officer in ["alice", "bob", "carol"] {
        let channel = connect(pki, port, &pki.client(officer, &[Role::Officer]))
            .await
            .unwrap();
        channels.insert(officer.to_string(), channel);
    }
    channels
}

/// Waits (bounded, 20 s) until process `pid` is stopped by a signal, as a
/// custodyd started with `CUSTODY_STOP_AT` is at its stop point.
pub async fn stopped(pid: u32) {
    for _ in 0..400 {
        if crate::process_state(pid) == Some('T') {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("process {pid} never stopped at its stop point");
}

/// Lets process `pid`, stopped at its stop point, go on (SIGCONT).
pub fn go_on(pid: u32) {
    let continued = std::process::Command::new("kill")
        .args(["-CONT", &pid.to_string()])
        .status()
        .expect("kill runs");
    assert!(continued.success(), "process {pid} could not be continued");
}
