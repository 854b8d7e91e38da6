//! custodyd in the test process, on the test's own token, listening on
//! `127.0.0.1:0` with real mTLS and a dev PKI made for the test.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use custody_core::Custody;
use custody_core::clock::Clock;
use custody_core::config::{
    AuditSection, CeremonySection, Config, ConnectionsSection, DualControlSection, EnvelopeSection,
    HsmSection, LifecycleSection, MetricsSection, PolicySection, StorageSection, TlsSection,
};
use custody_core::dual_control::officer_key::OfficerKey;
use custody_core::dual_control::{approval_message, denial_message};
use custody_core::identity::Role;
use custody_daemon::devpki::{Ca, DEV_IDENTITIES, Issued, Validity};
use custody_daemon::server::Daemon;
use custody_proto::v1::operation_service_client::OperationServiceClient;
use custody_proto::v1::{
    Operation, OperationKind, OperationSpec, OperationState, RequestOperationRequest,
    SetPolicySpec, VoteRequest, operation_spec,
};
use tokio::net::TcpListener;
use tonic::transport::Channel;

use crate::TestToken;

/// The CA, certificate and key files of a client identity.
pub struct ClientFiles {
    /// The service's CA certificate.
    pub ca: PathBuf,
    /// The client certificate.
    pub cert: PathBuf,
    /// The client's private key.
    pub key: PathBuf,
}

/// The officers of every test service; `alice` and `bob` are also dev identities.
pub const OFFICERS: [&str; 3] = ["alice", "bob", "carol"];

/// A clock the test moves by hand: a wall clock and the monotonic clock
/// custodyd checks it against.
#[derive(Debug)]
pub struct ManualClock {
    wall: std::sync::atomic::AtomicI64,
    monotonic: std::sync::atomic::AtomicI64,
}

impl ManualClock {
    /// A clock reading `wall_ms`.
    pub fn at(wall_ms: i64) -> ManualClock {
        ManualClock {
            wall: std::sync::atomic::AtomicI64::new(wall_ms),
            monotonic: std::sync::atomic::AtomicI64::new(0),
        }
    }

    /// Lets `ms` pass (wall and monotonic clocks alike; may be negative
    /// only in tests of what a rule does just before a deadline).
    pub fn advance(&self, ms: i64) {
        self.wall.fetch_add(ms, std::sync::atomic::Ordering::SeqCst);
        self.monotonic
            .fetch_add(ms.max(0), std::sync::atomic::Ordering::SeqCst);
    }

    /// Steps the wall clock by `ms` (negative: back) while no time passes,
    /// as an operator or a broken time source does.
    pub fn step(&self, ms: i64) {
        self.wall.fetch_add(ms, std::sync::atomic::Ordering::SeqCst);
    }

    /// Sets the wall clock to `wall_ms` while no time passes.
    pub fn set(&self, wall_ms: i64) {
        self.wall
            .store(wall_ms, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> i64 {
        self.wall.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn monotonic_ms(&self) -> i64 {
        self.monotonic.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// A running custodyd and the PKI around it.
pub struct TestService {
    /// The officers' keys, in [`OFFICERS`] order.
    pub officers: Vec<OfficerKey>,
    /// The clock approvals expire by.
    pub clock: Arc<ManualClock>,
    /// The CA of server and client certificates.
    pub ca: Ca,
    /// A client certificate (principal `revoked`, signer) listed in the CRL.
    pub revoked: Issued,
    /// The config it runs with.
    pub config: Config,
    dir: PathBuf,
    running: Option<Running>,
}

struct Running {
    addr: SocketAddr,
    state: Arc<Custody>,
    tls: Arc<custody_daemon::tls::TlsReloader>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), String>>>,
    start_phases: custody_daemon::phases::StartPhases,
}

impl Running {
    async fn launch(config: &Config, clock: Arc<ManualClock>) -> Result<Running, String> {
        let daemon = Daemon::open_with_clock(config.clone(), clock).await?;
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let state = daemon.state.clone();
        let tls = daemon.tls.clone();
        let start_phases = daemon.start_phases.clone();
        let (shutdown, stop) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(daemon.serve(listener, async {
            let _ = stop.await;
            "the test's stop"
        }));
        Ok(Running {
            addr,
            state,
            tls,
            shutdown: Some(shutdown),
            task: Some(task),
            start_phases,
        })
    }

    fn begin_stop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
    }

    async fn stop(&mut self) {
        self.begin_stop();
        if let Some(task) = self.task.take() {
            task.await.expect("server task").expect("server ran");
        }
        // Connection tasks let go of the server's state shortly after the
        // server returns; the database stays locked until they do.
        for _ in 0..500 {
            if Arc::strong_count(&self.state) == 1 {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!(
            "{} holders of the stopped server's state remain after 5 s",
            Arc::strong_count(&self.state) - 1
        );
    }
}

impl TestService {
    /// Starts custodyd on `token`, with every algorithm allowed.
    pub async fn start(token: &TestToken) -> TestService {
        Self::start_with(token, |_| {}).await
    }

    /// [`Self::start`], with the config adjusted by `adjust` first.
    pub async fn start_with(token: &TestToken, adjust: impl FnOnce(&mut Config)) -> TestService {
        Self::try_start_with(token, adjust)
            .await
            .expect("custodyd starts")
    }

    /// [`Self::start_with`], returning custodyd's refusal to start instead of
    /// panicking.
    pub async fn try_start_with(
        token: &TestToken,
        adjust: impl FnOnce(&mut Config),
    ) -> Result<TestService, String> {
        let dir = token.scratch().join("custodyd");
        std::fs::create_dir_all(&dir).expect("service dir");
        let ca = Ca::new("custody test CA").expect("CA");
        let server = ca
            .issue_server(&["localhost", "127.0.0.1"])
            .expect("server cert");
        let revoked = ca
            .issue_client(
                "revoked",
                &[custody_core::identity::Role::Signer],
                Validity::days(30),
            )
            .expect("revoked client cert");
        let write = |name: &str, contents: &str| {
            let path = dir.join(name);
            std::fs::write(&path, contents).expect("write PKI file");
            path
        };
        let mut config = Config {
            listen: "127.0.0.1:0".parse().expect("address"),
            data_dir: dir.join("data"),
            max_message_bytes: 256 * 1024,
            max_concurrent_requests: 256,
            hsm: HsmSection {
                module: crate::module_path(),
                token_label: token.label().into(),
                pin_file: Some(token.pin_file()),
                pin_env: None,
                workers: 2,
                max_pin_failures: 5,
                max_queued_jobs: hsm_shim::HsmConfig::DEFAULT_MAX_QUEUED,
                max_queued_per_caller: custody_core::config::DEFAULT_HSM_SHARE,
                call_timeout_ms: 30_000,
            },
            tls: TlsSection {
                cert: write("server.pem", &server.cert_pem),
                key: write("server.key", &server.key_pem),
                client_ca: write("ca.pem", ca.cert_pem()),
                crls: vec![write("crl.pem", &ca.crl(&[&revoked]).expect("CRL"))],
                min_version: "1.3".into(),
            },
            connections: ConnectionsSection::default(),
            metrics: MetricsSection::default(),
            // No periodic self-test signatures: they would take faults the
            // tests arm for their own calls (tests of readiness turn it on).
            health: custody_core::readiness::HealthSection {
                self_test_interval_secs: 0,
            },
            policy: PolicySection {
                allowed_algorithms: custody_core::algorithms::KeyAlgorithm::ALL
                    .iter()
                    .map(|a| a.api_name().to_string())
                    .collect(),
            },
            audit: AuditSection::default(),
            dual_control: DualControlSection {
                genesis_file: Some(dir.join("officers.toml")),
                ..DualControlSection::default()
            },
            // The scheduler ticks every second, so that tests which move the
            // clock see it act promptly; drift is checked only on request.
            lifecycle: LifecycleSection {
                scheduler_interval_secs: 1,
                drift_check_interval_secs: 0,
                ..LifecycleSection::default()
            },
            envelope: EnvelopeSection::default(),
            // KEK ceremonies may run; drills only where a test adds the
            // scratch token (see `with_scratch_token`).
            ceremony: CeremonySection {
                so_pin_file: Some(token.so_pin_file()),
                ..CeremonySection::default()
            },
            // The rule stays on, with a reserve a busy test machine still has.
            storage: StorageSection {
                reserve_mib: 1,
                ..StorageSection::default()
            },
            store: Default::default(),
        };
        // Three officers, two of whom make the administrative quorum.
        let passphrase = hsm_shim::SecretString::from("test passphrase, long enough");
        let mut officers = Vec::new();
        let mut genesis = String::from("required = 2\n");
        for name in OFFICERS {
            let (key, _) = OfficerKey::generate(name, &passphrase).expect("officer key");
            genesis.push_str(&format!(
                "[[officers]]\nid = \"{name}\"\nprincipal = \"{name}\"\npublic_key = \"{}\"\n",
                hex::encode(key.public_key())
            ));
            officers.push(key);
        }
        write("officers.toml", &genesis);
        adjust(&mut config);
        config.check().expect("test config is valid");
        let clock = Arc::new(ManualClock::at(custody_core::clock::SystemClock.now_ms()));
        let running = Some(Running::launch(&config, clock.clone()).await?);
        Ok(TestService {
            officers,
            clock,
            ca,
            revoked,
            config,
            dir,
            running,
        })
    }

    fn running(&self) -> &Running {
        self.running.as_ref().expect("the service is running")
    }

    /// The daemon's shared state (HSM, registry, audit log).
    pub fn state(&self) -> &Arc<Custody> {
        &self.running().state
    }

    /// How long each phase of custodyd's last start took (the start-up
    /// bench prints them).
    pub fn start_phases(&self) -> &custody_daemon::phases::StartPhases {
        &self.running().start_phases
    }

    /// Reloads the TLS files, as SIGHUP does.
    pub fn reload_tls(&self) -> Result<(), String> {
        self.running().tls.reload()
    }

    /// How many authenticated client connections custodyd has open.
    pub fn open_connections(&self) -> usize {
        self.running().tls.open_connections()
    }

    /// Stops the server (in-flight requests finish) and starts it again on
    /// the same data directory and token: a restart. Callers must not hold
    /// the old [`Self::state`] across it.
    pub async fn restart(&mut self) {
        self.stop().await;
        self.running = Some(
            Running::launch(&self.config, self.clock.clone())
                .await
                .expect("custodyd restarts"),
        );
    }

    /// Starts the server again after [`Self::stop`], on [`Self::config`] as
    /// it is now; custodyd's refusal to start if it refuses.
    pub async fn try_restart(&mut self) -> Result<(), String> {
        self.stop().await;
        self.running = Some(Running::launch(&self.config, self.clock.clone()).await?);
        Ok(())
    }

    /// Stops the server and releases its database.
    pub async fn stop(&mut self) {
        if let Some(mut running) = self.running.take() {
            running.stop().await;
        }
    }

    /// Begins the graceful stop, as SIGTERM does, without waiting for it:
    /// the server drains while the test looks on; [`Self::stop`] waits.
    pub fn begin_stop(&mut self) {
        if let Some(running) = self.running.as_mut() {
            running.begin_stop();
        }
    }

    /// The address custodyd listens on.
    pub fn addr(&self) -> SocketAddr {
        self.running().addr
    }

    /// How many records the audit log holds.
    pub fn audit_len(&self) -> usize {
        self.state().audit.records(1).count()
    }

    /// The outcomes of the `method` requests recorded after the first
    /// `before` records, in order.
    pub fn outcomes_since(&self, before: usize, method: &str) -> Vec<String> {
        self.audit_events_since(before)
            .into_iter()
            .filter(|event| event["type"] == "request" && event["method"] == method)
            .map(|event| event["outcome"].as_str().unwrap_or_default().to_string())
            .collect()
    }

    /// The audit events appended after the first `before` records, the
    /// periodic signed checkpoints aside.
    pub fn audit_events_since(&self, before: usize) -> Vec<serde_json::Value> {
        self.state()
            .audit
            .records(1)
            .skip(before)
            .map(|r| r.expect("an audit record reads back"))
            .map(|r| serde_json::from_slice::<serde_json::Value>(&r.entry).expect("a JSON record"))
            .map(|entry| entry["event"].clone())
            .filter(|event| event["type"] != "checkpoint")
            .collect()
    }

    /// `https://localhost:{port}`.
    pub fn url(&self) -> String {
        format!("https://localhost:{}", self.running().addr.port())
    }

    /// A channel as one of the dev identities (`operator`, `ca-issuing`,
    /// `auditor`, `alice`).
    pub async fn client(&self, principal: &str) -> Channel {
        let (_, roles) = DEV_IDENTITIES
            .iter()
            .find(|(p, _)| *p == principal)
            .expect("a dev identity");
        let issued = self
            .ca
            .issue_client(principal, roles, Validity::days(30))
            .expect("client cert");
        self.client_with(&issued).await.expect("connect")
    }

    /// A channel per enrolled officer (alice, bob, carol), by officer id:
    /// what [`crate::ceremony::Officers`] is made from.
    pub async fn officer_channels(&self) -> std::collections::BTreeMap<String, Channel> {
        let mut channels = std::collections::BTreeMap::new();
        for officer in ["alice", "bob", "carol"] {
            channels.insert(officer.to_string(), self.client(officer).await);
        }
        channels
    }

    /// A channel as `principal` holding `roles`, with a fresh certificate.
    pub async fn client_as(&self, principal: &str, roles: &[Role]) -> Channel {
        let issued = self
            .ca
            .issue_client(principal, roles, Validity::days(30))
            .expect("client cert");
        self.client_with(&issued).await.expect("connect")
    }

    /// A fresh certificate for `principal` holding `roles`, written into
    /// `dir` with the service's CA, for clients that read files (the
    /// Python clients, the PKCS#11 module).
    pub fn client_files(
        &self,
        dir: &std::path::Path,
        principal: &str,
        roles: &[Role],
    ) -> ClientFiles {
        let issued = self
            .ca
            .issue_client(principal, roles, Validity::days(30))
            .expect("client cert");
        std::fs::create_dir_all(dir).expect("client files directory");
        let write = |name: String, contents: &str| {
            let path = dir.join(name);
            std::fs::write(&path, contents).expect("write a client file");
            path
        };
        ClientFiles {
            ca: write("ca.pem".into(), self.ca.cert_pem()),
            cert: write(format!("{principal}.pem"), &issued.cert_pem),
            key: write(format!("{principal}.key"), &issued.key_pem),
        }
    }

    /// The key of officer `name`.
    pub fn officer(&self, name: &str) -> &OfficerKey {
        self.officers
            .iter()
            .find(|k| k.officer_id() == name)
            .expect("an officer of the test service")
    }

    /// A channel presenting `issued`.
    pub async fn client_with(&self, issued: &Issued) -> Result<Channel, String> {
        custody_daemon::client::connect(
            &self.url(),
            self.ca.cert_pem(),
            &issued.cert_pem,
            &issued.key_pem,
        )
        .await
    }

    /// A scratch directory of the service.
    pub fn dir(&self) -> &PathBuf {
        &self.dir
    }

    /// Officer `officer`'s vote on `operation`: its signature over the
    /// approval (or denial) message of the operation's digest.
    pub fn vote_for(&self, officer: &str, operation: &Operation, approve: bool) -> VoteRequest {
        let digest: [u8; 32] = operation
            .digest
            .clone()
            .try_into()
            .expect("a 32-byte digest");
        let message = if approve {
            approval_message(&digest)
        } else {
            denial_message(&digest)
        };
        VoteRequest {
            name: operation.name.clone(),
            officer_id: officer.into(),
            signature: self.officer(officer).sign(&message).to_vec(),
        }
    }

    /// Officer `officer` approves `operation` over its own officer channel.
    pub async fn approve(
        &self,
        officer: &str,
        operation: &Operation,
    ) -> Result<Operation, tonic::Status> {
        let channel = self.client_as(officer, &[Role::Officer]).await;
        OperationServiceClient::new(channel)
            .approve_operation(self.vote_for(officer, operation, true))
            .await
            .map(|r| r.into_inner())
    }
}

impl TestService {
    /// Puts `kind` on `key_id` under 2 of alice, bob, carol, approved by the
    /// administrative quorum (alice and bob); checks each step.
    pub async fn gate(&self, key_id: &str, kind: OperationKind) {
        self.set_policy(key_id, kind, 2, ["alice", "bob"]).await;
    }

    /// Puts `kind` on `key_id` under `required` of alice, bob, carol, the
    /// change approved by the two `approvers` (the administrative quorum);
    /// checks each step.
    pub async fn set_policy(
        &self,
        key_id: &str,
        kind: OperationKind,
        required: u32,
        approvers: [&str; 2],
    ) {
        let operator = self.client("operator").await;
        let operation = request_operation(
            &operator,
            operation_spec::Spec::SetPolicy(SetPolicySpec {
                name: format!("keys/{key_id}"),
                operation: kind as i32,
                officers: vec!["alice".into(), "bob".into(), "carol".into()],
                required,
            }),
        )
        .await
        .expect("policy change requested");
        assert_eq!(operation.state, OperationState::Pending as i32);
        let after_one = self
            .approve(approvers[0], &operation)
            .await
            .expect("the first officer approves");
        assert_eq!(after_one.state, OperationState::Pending as i32);
        let done = self
            .approve(approvers[1], &operation)
            .await
            .expect("the second officer approves");
        assert_eq!(
            done.state,
            OperationState::Succeeded as i32,
            "{}",
            done.error
        );
    }
}

/// Creates `key_id` as the operator over `operator`, usable by `ca-issuing`,
/// with the algorithm of API name `algorithm` and an optional cryptoperiod.
pub async fn create_key(
    operator: &Channel,
    key_id: &str,
    algorithm: &str,
    cryptoperiod_secs: Option<i64>,
) -> custody_proto::v1::Key {
    let algorithm =
        custody_core::algorithms::KeyAlgorithm::from_api_name(algorithm).expect("an algorithm");
    custody_proto::v1::key_service_client::KeyServiceClient::new(operator.clone())
        .create_key(custody_proto::v1::CreateKeyRequest {
            key_id: key_id.into(),
            algorithm: custody_daemon::wire::algorithm(algorithm) as i32,
            purpose: custody_daemon::wire::purpose(algorithm.purpose()) as i32,
            allowed_signers: vec!["ca-issuing".into()],
            cryptoperiod: cryptoperiod_secs
                .map(|seconds| prost_types::Duration { seconds, nanos: 0 }),
            ..Default::default()
        })
        .await
        .expect("key created")
        .into_inner()
}

/// Requests an operation over `channel`.
pub async fn request_operation(
    channel: &Channel,
    spec: operation_spec::Spec,
) -> Result<Operation, tonic::Status> {
    OperationServiceClient::new(channel.clone())
        .request_operation(RequestOperationRequest {
            spec: Some(OperationSpec { spec: Some(spec) }),
        })
        .await
        .map(|r| r.into_inner())
}

/// A two-thread runtime for a test's async body.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

pub use custody_proto::reason;

/// The label of the scratch token DR drills restore into.
pub const SCRATCH_TOKEN: &str = "custody-scratch";

/// Adds the scratch token next to `token` and points `config` at it: use in
/// [`TestService::start_with`] for tests that drill.
pub fn with_scratch_token(token: &TestToken, config: &mut Config) {
    token.add_token(SCRATCH_TOKEN);
    config.ceremony.scratch_token_label = Some(SCRATCH_TOKEN.into());
    config.ceremony.scratch_pin_file = Some(token.pin_file());
}

/// A direct Sign of SHA-256(`message`) with `key_id` as the signer of
/// `channel` (an ECDSA key's signature is DER).
pub async fn sign_sha256(
    channel: &Channel,
    key_id: &str,
    message: &[u8],
) -> Result<Vec<u8>, tonic::Status> {
    use custody_proto::v1::signing_service_client::SigningServiceClient;
    use custody_proto::v1::{Digest, SignRequest, digest, sign_request};
    use sha2::Digest as _;
    SigningServiceClient::new(channel.clone())
        .sign(SignRequest {
            name: format!("keys/{key_id}"),
            input: Some(sign_request::Input::Digest(Digest {
                digest: Some(digest::Digest::Sha256(
                    sha2::Sha256::digest(message).to_vec(),
                )),
            })),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner().signature)
}

/// Sends `requests` down one SignStream on `channel` and collects every
/// answer, in the order they came.
pub async fn sign_in_one_stream(
    channel: Channel,
    requests: Vec<custody_proto::v1::SignRequest>,
) -> Vec<custody_proto::v1::SignResponse> {
    use custody_proto::v1::signing_service_client::SigningServiceClient;
    use futures_util::StreamExt as _;
    SigningServiceClient::new(channel)
        .sign_stream(futures_util::stream::iter(requests))
        .await
        .expect("the stream opens")
        .into_inner()
        .map(|r| r.expect("the stream goes on to its end"))
        .collect()
        .await
}

/// The Prometheus page custodyd serves on `port` (blocking: call it from a
/// blocking task in async code).
pub fn scrape_metrics(port: u16) -> String {
    metrics_endpoint(port, "GET", "/metrics")
}

/// The whole HTTP/1.0 answer (status line, headers, body) of custodyd's
/// metrics endpoint on `port` to `method` `path` (blocking).
pub fn metrics_endpoint(port: u16, method: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("metrics endpoint");
    stream
        .write_all(format!("{method} {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .expect("metrics request");
    let mut text = String::new();
    stream.read_to_string(&mut text).expect("metrics page");
    text
}

/// Writes `keys` registry records (EC P-256, one active version each,
/// named `key-00000` on) straight into custodyd's database, for benchmarks
/// of start-up and drift; their HSM objects do not exist.
pub fn fill_registry(db: &custody_store::Store, keys: usize) {
    use custody_core::registry::{KeyRecord, VersionRecord, VersionState};
    let tree = db.keyspace("keys").expect("keyspace");
    for i in 0..keys {
        let record = KeyRecord {
            key_id: format!("key-{i:05}"),
            algorithm: "EC_SIGN_P256_SHA256".into(),
            allowed_signers: vec!["ca-issuing".into()],
            primary_version: 1,
            created_ms: 0,
            versions: vec![VersionRecord {
                version: 1,
                state: VersionState::Active,
                created_ms: 0,
                state_ms: 0,
                hsm_label: format!("key/key-{i:05}/v1"),
                public_key_der_hex: "00".repeat(91),
                public_key_pem: "-----BEGIN PUBLIC KEY-----\n".to_string()
                    + &"A".repeat(124)
                    + "\n-----END PUBLIC KEY-----\n",
                activated_ms: Some(0),
                destroy_at_ms: None,
                legal_hold: None,
                check_value: String::new(),
                certificate_chain_pem: Vec::new(),
                reserved_by: None,
                destroying_since_ms: None,
                destroy_approved_under: None,
            }],
            policies: Default::default(),
            cryptoperiod_ms: None,
            min_version: 0,
            rotation_requests: Vec::new(),
            backup_exportable: false,
            retired_at_version: None,
        };
        tree.insert(
            record.key_id.as_bytes(),
            serde_json::to_vec(&record).expect("json"),
        )
        .expect("insert");
    }
    db.flush().expect("flush");
}

/// One of an HSM pool's workers held by a job until [`Self::release`]:
/// for tests of what waits behind it.
pub struct HeldWorker {
    release: std::sync::mpsc::Sender<()>,
    job: tokio::task::JoinHandle<Result<(), hsm_shim::HsmError>>,
}

impl HeldWorker {
    /// Holds one of `hsm`'s workers; returns once the holding job runs.
    pub async fn hold(hsm: &hsm_shim::Hsm) -> HeldWorker {
        let (started, running) = tokio::sync::oneshot::channel();
        let (release, released) = std::sync::mpsc::channel::<()>();
        let job = tokio::spawn({
            let hsm = hsm.clone();
            async move {
                hsm.run(move |_| {
                    let _ = started.send(());
                    let _ = released.recv();
                    Ok(())
                })
                .await
            }
        });
        running.await.expect("the holding job runs");
        HeldWorker { release, job }
    }

    /// Lets the holding job end.
    pub async fn release(self) {
        self.release.send(()).expect("the holding job waits");
        self.job
            .await
            .expect("the holding task")
            .expect("the holding job");
    }
}
