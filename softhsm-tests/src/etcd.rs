//! A real etcd cluster for the store tests: N `etcd` processes (Debian's
//! `etcd-server`, 3.4) on loopback, each with a data dir in a temp dir,
//! client connections over mTLS only (`--client-cert-auth`, a CA, server
//! and client certificates made here with rcgen), peer traffic on loopback.
//! Members can be SIGKILLed and restarted; dropping the cluster kills them
//! all.
//!
//! No etcd installed is a failure, not a skip: `deploy/install-deps.sh`
//! installs it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use custody_store::{EtcdConfig, Store};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// How long a member may take to serve linearizable reads after a start.
const HEALTHY_WITHIN: Duration = Duration::from_secs(60);

/// The TLS files a client of the cluster uses.
#[derive(Debug, Clone)]
pub struct Tls {
    /// The CA that signed the members' and the client's certificates.
    pub ca: PathBuf,
    /// The client certificate.
    pub cert: PathBuf,
    /// The client's private key.
    pub key: PathBuf,
}

struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    process: Option<Child>,
}

/// How many times a cluster is laid out afresh when a member cannot bind
/// its port (a port found free may be taken, as the local end of some
/// other connection, before etcd binds it).
const START_ATTEMPTS: usize = 3;

/// What a member that exited because its port was taken says.
const PORT_TAKEN: &str = "address already in use";

/// A running etcd cluster on loopback.
pub struct Cluster {
    dir: tempfile::TempDir,
    /// The data dirs and logs of the current layout, inside `dir`.
    run: PathBuf,
    members: Vec<Member>,
    tls: Tls,
    token: String,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("endpoints", &self.endpoints())
            .finish()
    }
}

fn write(path: &Path, contents: &str, secret: bool) {
    std::fs::write(path, contents).expect("write a TLS file");
    if secret {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .expect("restrict a key file");
    }
}

/// A CA, a server certificate for loopback (also good as a client
/// certificate: etcd 3.4's own gateway dials the member with it) and a
/// client certificate, written into `dir`.
fn make_pki(dir: &Path) -> Tls {
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca = CertificateParams::default();
    ca.distinguished_name
        .push(DnType::CommonName, "custody test etcd CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca.self_signed(&ca_key).expect("CA certificate");
    let issuer = Issuer::from_params(&ca, &ca_key);

    let issue = |names: Vec<String>, purposes: Vec<ExtendedKeyUsagePurpose>, cn: &str| {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(names).expect("certificate names");
        params.distinguished_name.push(DnType::CommonName, cn);
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = purposes;
        let cert = params.signed_by(&key, &issuer).expect("certificate");
        (cert.pem(), key.serialize_pem())
    };
    let (server_pem, server_key) = issue(
        vec!["127.0.0.1".into(), "localhost".into()],
        vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ],
        "etcd member",
    );
    let (client_pem, client_key) = issue(
        Vec::new(),
        vec![ExtendedKeyUsagePurpose::ClientAuth],
        "custodyd",
    );
    let tls = Tls {
        ca: dir.join("ca.pem"),
        cert: dir.join("client.pem"),
        key: dir.join("client.key"),
    };
    write(&tls.ca, &ca_cert.pem(), false);
    write(&dir.join("server.pem"), &server_pem, false);
    write(&dir.join("server.key"), &server_key, true);
    write(&tls.cert, &client_pem, false);
    write(&tls.key, &client_key, true);
    tls
}

impl Cluster {
    /// Starts a cluster of `members` members and waits until every one
    /// serves linearizable reads.
    pub fn start(members: usize) -> Cluster {
        let dir = tempfile::tempdir().expect("cluster temp dir");
        let tls = make_pki(dir.path());
        let mut cluster = Cluster {
            run: dir.path().to_path_buf(),
            dir,
            members: Vec::new(),
            tls,
            token: String::new(),
        };
        for attempt in 1..=START_ATTEMPTS {
            cluster.lay_out(members, attempt);
            for i in 0..members {
                cluster.spawn(i);
            }
            match (0..members).try_for_each(|i| cluster.healthy(i)) {
                Ok(()) => return cluster,
                Err(why) if why.contains(PORT_TAKEN) && attempt < START_ATTEMPTS => {
                    eprintln!("etcd cluster start {attempt}: a port was taken; again");
                    for i in 0..members {
                        cluster.kill(i);
                    }
                }
                Err(why) => panic!("{why}"),
            }
        }
        unreachable!("the last attempt returns or panics")
    }

    /// New ports, data dirs and cluster token for `count` members.
    fn lay_out(&mut self, count: usize, attempt: usize) {
        self.run = self.dir.path().join(format!("run{attempt}"));
        std::fs::create_dir_all(&self.run).expect("cluster run dir");
        let ports = crate::process::free_ports(2 * count);
        self.members = (0..count)
            .map(|i| Member {
                name: format!("m{i}"),
                client_port: ports[2 * i],
                peer_port: ports[2 * i + 1],
                process: None,
            })
            .collect();
        self.token = format!(
            "custody-test-{}-{attempt}",
            self.dir
                .path()
                .file_name()
                .map_or_else(String::new, |name| name.to_string_lossy().into_owned())
        );
    }

    fn spawn(&mut self, i: usize) {
        let initial_cluster = self
            .members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect::<Vec<_>>()
            .join(",");
        let dir = self.dir.path();
        let run = &self.run;
        let member = &self.members[i];
        let client_url = format!("https://127.0.0.1:{}", member.client_port);
        let peer_url = format!("http://127.0.0.1:{}", member.peer_port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(run.join(format!("{}.log", member.name)))
            .expect("member log file");
        let spawned = Command::new("etcd")
            .arg(format!("--name={}", member.name))
            .arg(format!("--data-dir={}", run.join(&member.name).display()))
            .arg(format!("--listen-client-urls={client_url}"))
            .arg(format!("--advertise-client-urls={client_url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster={initial_cluster}"))
            .arg(format!("--initial-cluster-token={}", self.token))
            // Ignored once the data dir exists (a restart).
            .arg("--initial-cluster-state=new")
            .arg("--client-cert-auth")
            .arg(format!(
                "--trusted-ca-file={}",
                dir.join("ca.pem").display()
            ))
            .arg(format!("--cert-file={}", dir.join("server.pem").display()))
            .arg(format!("--key-file={}", dir.join("server.key").display()))
            .arg("--logger=zap")
            .arg("--log-outputs=stderr")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("member log file"))
            .stderr(log)
            .spawn();
        match spawned {
            Ok(child) => self.members[i].process = Some(child),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
                "etcd is not installed: run deploy/install-deps.sh (it installs Debian's \
                 etcd-server)"
            ),
            Err(e) => panic!("cannot start etcd: {e}"),
        }
    }

    /// Waits until member `i` serves a linearizable read (a leader is
    /// elected and the member is part of it), or panics with its log.
    pub fn wait_healthy(&mut self, i: usize) {
        if let Err(why) = self.healthy(i) {
            panic!("{why}");
        }
    }

    /// Waits until member `i` serves a linearizable read; else why not,
    /// with its log.
    fn healthy(&mut self, i: usize) -> Result<(), String> {
        let deadline = Instant::now() + HEALTHY_WITHIN;
        let mut config = self.config_for(vec![self.endpoint(i)], "health/");
        config.request_timeout = Duration::from_secs(2);
        let mut last = String::new();
        while Instant::now() < deadline {
            if let Some(Ok(Some(status))) = self.members[i]
                .process
                .as_mut()
                .map(|process| process.try_wait())
            {
                return Err(format!(
                    "etcd member {i} exited ({status}):\n{}",
                    self.log(i)
                ));
            }
            match Store::open_etcd(&config).and_then(|store| store.keyspace_names()) {
                Ok(_) => return Ok(()),
                Err(e) => last = e.to_string(),
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Err(format!(
            "etcd member {i} not healthy within {HEALTHY_WITHIN:?}: {last}\n{}",
            self.log(i)
        ))
    }

    /// The end of member `i`'s log.
    pub fn log(&self, i: usize) -> String {
        let log =
            std::fs::read_to_string(self.dir.path().join(format!("m{i}.log"))).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    fn endpoint(&self, i: usize) -> String {
        format!("https://127.0.0.1:{}", self.members[i].client_port)
    }

    /// The members' client URLs.
    pub fn endpoints(&self) -> Vec<String> {
        (0..self.members.len()).map(|i| self.endpoint(i)).collect()
    }

    /// The client's TLS files.
    pub fn tls(&self) -> &Tls {
        &self.tls
    }

    /// The `[store]` section of a custodyd replica `id` on this cluster,
    /// its keys under `prefix` (custodyd's default if `None`).
    pub fn store_section(&self, id: &str, prefix: Option<&str>) -> String {
        let endpoints: Vec<String> = self.endpoints().iter().map(|e| format!("{e:?}")).collect();
        let prefix = prefix
            .map(|p| format!("prefix = {p:?}\n"))
            .unwrap_or_default();
        format!(
            "[store]\nbackend = \"etcd\"\nreplica_id = \"{id}\"\nendpoints = [{}]\n{prefix}ca = {:?}\ncert = {:?}\nkey = {:?}\n",
            endpoints.join(", "),
            self.tls.ca,
            self.tls.cert,
            self.tls.key
        )
    }

    /// A store configuration for every member, keys under `prefix`.
    pub fn config(&self, prefix: &str) -> EtcdConfig {
        self.config_for(self.endpoints(), prefix)
    }

    fn config_for(&self, endpoints: Vec<String>, prefix: &str) -> EtcdConfig {
        let mut config = EtcdConfig::new(
            endpoints,
            self.tls.ca.clone(),
            self.tls.cert.clone(),
            self.tls.key.clone(),
        );
        config.prefix = prefix.to_string();
        config
    }

    /// SIGKILLs member `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut process) = self.members[i].process.take() {
            let _ = process.kill();
            let _ = process.wait();
        }
    }

    /// Freezes member `i` (SIGSTOP): it keeps its connections and ports
    /// open and answers nothing, as a hung or partitioned member would.
    pub fn pause(&mut self, i: usize) {
        self.signal(i, "-STOP");
    }

    /// Lets member `i` run again after [`Cluster::pause`] (SIGCONT).
    pub fn resume(&mut self, i: usize) {
        self.signal(i, "-CONT");
    }

    fn signal(&self, i: usize, signal: &str) {
        let process = self.members[i].process.as_ref().expect("member running");
        let status = Command::new("kill")
            .arg(signal)
            .arg(process.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {signal} member {i}: {status}");
    }

    /// Compacts the cluster's history up to its newest revision (etcd's
    /// JSON gateway, with `curl` and the client certificate), so that no
    /// earlier revision can be read any more.
    pub fn compact(&self) {
        let revision = self.gateway("kv/range", r#"{"key":"AA=="}"#)["header"]["revision"]
            .as_str()
            .expect("a revision in the range answer")
            .to_string();
        self.gateway(
            "kv/compaction",
            &format!(r#"{{"revision":"{revision}","physical":true}}"#),
        );
    }

    fn gateway(&self, path: &str, body: &str) -> serde_json::Value {
        let (i, _) = self
            .members
            .iter()
            .enumerate()
            .find(|(_, member)| member.process.is_some())
            .expect("a member running");
        let output = Command::new("curl")
            .args(["--silent", "--show-error", "--fail", "--max-time", "10"])
            .arg("--cacert")
            .arg(&self.tls.ca)
            .arg("--cert")
            .arg(&self.tls.cert)
            .arg("--key")
            .arg(&self.tls.key)
            .args(["--data", body])
            .arg(format!("{}/v3/{path}", self.endpoint(i)))
            .output()
            .expect("run curl (deploy/install-deps.sh installs it)");
        assert!(
            output.status.success(),
            "etcd gateway {path}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).expect("JSON from etcd's gateway")
    }

    /// Starts member `i` again on its data dir and waits until it is
    /// healthy.
    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        for attempt in 1..=START_ATTEMPTS {
            self.spawn(i);
            match self.healthy(i) {
                Ok(()) => return,
                // Its ports are part of the cluster's membership: wait for
                // whatever took one to let go.
                Err(why) if why.contains(PORT_TAKEN) && attempt < START_ATTEMPTS => {
                    self.kill(i);
                    std::thread::sleep(Duration::from_secs(1));
                }
                Err(why) => panic!("{why}"),
            }
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}
