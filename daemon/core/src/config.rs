//! custodyd's configuration: one TOML file, every field documented in
//! `deploy/custodyd.toml`. Unknown fields are errors, so a typo never silently
//! falls back to a default. Secrets are never in this file: the HSM PIN comes
//! from `pin_file` or `pin_env`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

pub mod credentials;

use serde::Deserialize;

use crate::algorithms::KeyAlgorithm;

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Address of the gRPC listener (mTLS only).
    pub listen: SocketAddr,
    /// Directory of the embedded database (key registry and audit log) and of custodyd's local files.
    pub data_dir: PathBuf,
    /// Largest gRPC message accepted, in bytes.
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: usize,
    /// Most requests served at once; the rest wait.
    #[serde(default = "default_max_concurrent_requests")]
    pub max_concurrent_requests: usize,
    /// The HSM.
    pub hsm: HsmSection,
    /// TLS files and versions.
    pub tls: TlsSection,
    /// Limits on client connections: how many, how long, keepalive.
    #[serde(default)]
    pub connections: ConnectionsSection,
    /// Prometheus metrics.
    #[serde(default)]
    pub metrics: MetricsSection,
    /// Readiness: the signing self-test's interval.
    #[serde(default)]
    pub health: crate::readiness::HealthSection,
    /// Which algorithms keys may be created with.
    #[serde(default)]
    pub policy: PolicySection,
    /// Audit log checkpoints.
    #[serde(default)]
    pub audit: AuditSection,
    /// Officers and approvals.
    #[serde(default)]
    pub dual_control: DualControlSection,
    /// Rotation, destruction and drift checks.
    #[serde(default)]
    pub lifecycle: LifecycleSection,
    /// Envelope encryption.
    #[serde(default)]
    pub envelope: EnvelopeSection,
    /// Key ceremonies and DR drills.
    #[serde(default)]
    pub ceremony: CeremonySection,
    /// Room on the disk under `data_dir`.
    #[serde(default)]
    pub storage: StorageSection,
    /// Where the durable state lives: embedded, or shared by replicas.
    #[serde(default)]
    pub store: StoreSection,
}

/// `[store]`: the backend of the durable state. `sled` (the default) keeps
/// it in `data_dir`, for one custodyd; `etcd` keeps it in an etcd v3 cluster
/// that several custodyd replicas share.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreSection {
    /// `"sled"` or `"etcd"`.
    #[serde(default)]
    pub backend: StoreBackend,
    /// This replica's name, unique among the replicas of one store: audit
    /// records name it. Required with etcd.
    pub replica_id: Option<String>,
    /// etcd client URLs (`https://host:port`).
    #[serde(default)]
    pub endpoints: Vec<String>,
    /// The prefix of every key custodyd writes in etcd (default `custody/`).
    pub prefix: Option<String>,
    /// PEM file of the CA that signed the etcd members' certificates.
    pub ca: Option<PathBuf>,
    /// PEM client certificate custodyd presents to etcd.
    pub cert: Option<PathBuf>,
    /// PEM private key of `cert`.
    pub key: Option<PathBuf>,
    /// Deadline of one etcd request, in milliseconds (default 5000).
    pub request_timeout_ms: Option<u64>,
}

/// The backends of `[store] backend`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreBackend {
    /// sled, embedded in `data_dir`.
    #[default]
    Sled,
    /// An etcd v3 cluster shared by replicas.
    Etcd,
}

impl StoreSection {
    /// The longest replica id: it is written into every audit record.
    pub const MAX_REPLICA_ID: usize = 64;

    fn check(&self) -> Result<(), ConfigError> {
        let problem = |text: &str| Err(ConfigError(format!("[store] {text}")));
        if let Some(id) = &self.replica_id {
            let fits = !id.is_empty()
                && id.len() <= Self::MAX_REPLICA_ID
                && id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
            if !fits {
                return problem("replica_id must be 1-64 characters of A-Z a-z 0-9 . _ -");
            }
        }
        match self.backend {
            StoreBackend::Sled => {
                let etcd_only = !self.endpoints.is_empty()
                    || self.prefix.is_some()
                    || self.ca.is_some()
                    || self.cert.is_some()
                    || self.key.is_some()
                    || self.request_timeout_ms.is_some();
                if etcd_only {
                    return problem(
                        "endpoints, prefix, ca, cert, key and request_timeout_ms are for backend = \"etcd\"",
                    );
                }
            }
            StoreBackend::Etcd => {
                if self.replica_id.is_none() {
                    return problem("backend = \"etcd\" needs a replica_id");
                }
                if self.endpoints.is_empty() {
                    return problem("backend = \"etcd\" needs endpoints");
                }
                if let Some(bad) = self.endpoints.iter().find(|e| !e.starts_with("https://")) {
                    return problem(&format!(
                        "endpoint {bad:?} must be https:// (custodyd talks to etcd over mutual TLS only)"
                    ));
                }
                if self.ca.is_none() || self.cert.is_none() || self.key.is_none() {
                    return problem("backend = \"etcd\" needs ca, cert and key (mutual TLS)");
                }
                if self
                    .request_timeout_ms
                    .is_some_and(|ms| !(100..=60_000).contains(&ms))
                {
                    return problem("request_timeout_ms must be within 100-60000");
                }
            }
        }
        Ok(())
    }
}

/// `[lifecycle]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LifecycleSection {
    /// How long a scheduled destruction waits, during which it can be
    /// cancelled.
    #[serde(default = "default_destroy_cancel_window_secs")]
    pub destroy_cancel_window_secs: u64,
    /// How often the scheduler looks for due rotations and destructions.
    #[serde(default = "default_scheduler_interval_secs")]
    pub scheduler_interval_secs: u64,
    /// Rotate this long before the primary version's cryptoperiod ends (at
    /// most half the cryptoperiod).
    #[serde(default = "default_rotate_ahead_secs")]
    pub rotate_ahead_secs: u64,
    /// How often the scheduler compares the registry with the HSM; 0: never
    /// (CheckDrift still works).
    #[serde(default = "default_drift_check_interval_secs")]
    pub drift_check_interval_secs: u64,
    /// A wall-clock reading further than this from what the monotonic
    /// clock expects is a step (threat model F7): audited, alerted on, and
    /// when forward, scheduled destructions are held back by it.
    #[serde(default = "default_clock_step_tolerance_secs")]
    pub clock_step_tolerance_secs: u64,
}

impl Default for LifecycleSection {
    fn default() -> Self {
        Self {
            destroy_cancel_window_secs: default_destroy_cancel_window_secs(),
            scheduler_interval_secs: default_scheduler_interval_secs(),
            rotate_ahead_secs: default_rotate_ahead_secs(),
            drift_check_interval_secs: default_drift_check_interval_secs(),
            clock_step_tolerance_secs: default_clock_step_tolerance_secs(),
        }
    }
}

impl LifecycleSection {
    /// The cancel window in milliseconds.
    pub fn destroy_cancel_window_ms(&self) -> i64 {
        i64::try_from(self.destroy_cancel_window_secs)
            .unwrap_or(i64::MAX / 1000)
            .saturating_mul(1000)
    }

    /// The clock step tolerance in milliseconds.
    pub fn clock_step_tolerance_ms(&self) -> i64 {
        i64::try_from(self.clock_step_tolerance_secs)
            .unwrap_or(i64::MAX / 1000)
            .saturating_mul(1000)
    }
}

/// The shortest cancel window a configuration may set (threat model C27):
/// an hour in every build custodyd serves from. Only a build with crash
/// points compiled in (the `failpoints` feature: the SIGKILL tests' build,
/// which custodyd refuses to run optimised) accepts one second, so that
/// those tests reach a due destruction in real time.
pub const MIN_DESTROY_CANCEL_WINDOW_SECS: u64 =
    min_destroy_cancel_window_secs(crate::failpoint::COMPILED_IN);

/// The shortest cancel window of a build with (`crash_points`) or without
/// crash points compiled in.
pub const fn min_destroy_cancel_window_secs(crash_points: bool) -> u64 {
    if crash_points { 1 } else { 3600 }
}

fn default_destroy_cancel_window_secs() -> u64 {
    24 * 3600
}
fn default_scheduler_interval_secs() -> u64 {
    60
}
fn default_rotate_ahead_secs() -> u64 {
    3600
}
fn default_drift_check_interval_secs() -> u64 {
    300
}
fn default_clock_step_tolerance_secs() -> u64 {
    60
}

/// `[envelope]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvelopeSection {
    /// Encryptions one version may make before it refuses more: random
    /// 96-bit GCM nonces stay unique with overwhelming probability only up
    /// to 2^32 per key (NIST SP 800-38D, 8.3). The scheduler rotates a key
    /// once its primary version has used half.
    #[serde(default = "default_max_encryptions_per_version")]
    pub max_encryptions_per_version: u64,
}

impl Default for EnvelopeSection {
    fn default() -> Self {
        Self {
            max_encryptions_per_version: default_max_encryptions_per_version(),
        }
    }
}

fn default_max_encryptions_per_version() -> u64 {
    1 << 32
}

/// `[ceremony]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CeremonySection {
    /// File holding the token security officer's PIN. Only KEK ceremonies
    /// need it (the SO makes the trusted backup KEK); without it they are
    /// refused. Keep it readable by custodyd alone.
    pub so_pin_file: Option<PathBuf>,
    /// Label of the scratch token DR drills restore into (same module).
    pub scratch_token_label: Option<String>,
    /// File holding the scratch token's user PIN.
    pub scratch_pin_file: Option<PathBuf>,
    /// Audit keys of other custodyd instances whose backup bundles this one
    /// may restore: the SHA-256 of each key's SubjectPublicKeyInfo DER, 64
    /// hex digits, as the source published it. A bundle verifies only with
    /// this custodyd's own audit key, one of these, or the one its restore
    /// script names (`restore.audit_key_sha256`).
    #[serde(default)]
    pub trusted_audit_keys: Vec<String>,
    /// Most ceremonies one officer may have open (not finished) at once.
    #[serde(default = "default_max_open_per_officer")]
    pub max_open_per_officer: usize,
}

impl Default for CeremonySection {
    fn default() -> Self {
        Self {
            so_pin_file: None,
            scratch_token_label: None,
            scratch_pin_file: None,
            trusted_audit_keys: Vec::new(),
            max_open_per_officer: default_max_open_per_officer(),
        }
    }
}

fn default_max_open_per_officer() -> usize {
    4
}

impl CeremonySection {
    /// `trusted_audit_keys` as digests; refuses an entry that is not 64 hex
    /// digits.
    pub fn trusted_audit_keys(&self) -> Result<Vec<[u8; 32]>, ConfigError> {
        self.trusted_audit_keys
            .iter()
            .map(|pin| {
                hex::decode(pin)
                    .ok()
                    .and_then(|bytes| <[u8; 32]>::try_from(bytes).ok())
                    .ok_or_else(|| {
                        ConfigError(format!(
                            "[ceremony] trusted_audit_keys: {pin:?} is not a SHA-256 (64 hex digits) of an audit key's SubjectPublicKeyInfo DER"
                        ))
                    })
            })
            .collect()
    }
}

/// `[dual_control]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DualControlSection {
    /// The first officer set and administrative quorum, applied once, when no
    /// officer is enrolled yet.
    pub genesis_file: Option<PathBuf>,
    /// How long an operation waits for approvals.
    #[serde(default = "default_approval_ttl_secs")]
    pub approval_ttl_secs: u64,
    /// Whether one officer's signed denial vetoes an operation.
    #[serde(default = "default_true")]
    pub denial_vetoes: bool,
    /// Most operations one principal may have pending at once.
    #[serde(default = "default_max_pending_per_requester")]
    pub max_pending_per_requester: usize,
    /// How long a finished operation stays readable before it is pruned.
    #[serde(default = "default_operation_retention_secs")]
    pub operation_retention_secs: u64,
}

impl Default for DualControlSection {
    fn default() -> Self {
        Self {
            genesis_file: None,
            approval_ttl_secs: default_approval_ttl_secs(),
            denial_vetoes: true,
            max_pending_per_requester: default_max_pending_per_requester(),
            operation_retention_secs: default_operation_retention_secs(),
        }
    }
}

fn default_max_pending_per_requester() -> usize {
    32
}
fn default_operation_retention_secs() -> u64 {
    30 * 24 * 3600
}

fn default_approval_ttl_secs() -> u64 {
    600
}
fn default_true() -> bool {
    true
}

/// `[hsm]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HsmSection {
    /// Path of the PKCS#11 module.
    pub module: PathBuf,
    /// Label of the token to use.
    pub token_label: String,
    /// File holding the user PIN (one of `pin_file`, `pin_env`).
    pub pin_file: Option<PathBuf>,
    /// Environment variable holding the user PIN.
    pub pin_env: Option<String>,
    /// Worker threads, each with its own HSM session.
    #[serde(default = "default_hsm_workers")]
    pub workers: usize,
    /// Consecutive failed logins after which custodyd stops trying the PIN.
    #[serde(default = "default_max_pin_failures")]
    pub max_pin_failures: u32,
    /// Most request jobs (signing, envelope) waiting for a worker.
    #[serde(default = "default_max_queued_jobs")]
    pub max_queued_jobs: usize,
    /// Most HSM requests one caller has waiting for a worker or running,
    /// so that one caller cannot take the whole queue.
    #[serde(default = "default_max_queued_per_caller")]
    pub max_queued_per_caller: usize,
    /// Deadline of one PKCS#11 call, in milliseconds (1 to 600000).
    #[serde(default = "default_call_timeout_ms")]
    pub call_timeout_ms: u64,
}

/// `[tls]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    /// Server certificate chain, PEM.
    pub cert: PathBuf,
    /// Server private key, PEM.
    pub key: PathBuf,
    /// CA certificates that issue client certificates, PEM.
    pub client_ca: PathBuf,
    /// Certificate revocation lists (PEM or DER), checked for client certificates.
    #[serde(default)]
    pub crls: Vec<PathBuf>,
    /// Lowest TLS version: "1.3" (default) or "1.2" (AEAD suites only).
    #[serde(default = "default_min_tls")]
    pub min_version: String,
}

/// `[connections]`: how many clients may be connected or handshaking at
/// once, and how long a connection lives. A connection is authenticated once,
/// at its handshake; a maximum age bounds how long a certificate checked then
/// keeps working without a new check (a reload re-checks open connections at
/// once).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectionsSection {
    /// Most client connections open at once (handshaking or served); more
    /// are closed as soon as they are accepted.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Most TLS handshakes in progress at once; more are closed as soon as
    /// they are accepted.
    #[serde(default = "default_max_handshakes")]
    pub max_handshakes: usize,
    /// How long a client may take to finish its handshake.
    #[serde(default = "default_handshake_timeout_secs")]
    pub handshake_timeout_secs: u64,
    /// A connection older than this is asked to go away (HTTP/2 GOAWAY);
    /// the client reconnects, and its certificate is checked again.
    #[serde(default = "default_max_connection_age_secs")]
    pub max_connection_age_secs: u64,
    /// How long requests already running on a connection past its age may
    /// take before it is closed regardless.
    #[serde(default = "default_max_connection_age_grace_secs")]
    pub max_connection_age_grace_secs: u64,
    /// Interval of HTTP/2 keepalive pings to each client.
    #[serde(default = "default_keepalive_interval_secs")]
    pub keepalive_interval_secs: u64,
    /// A client that does not answer a ping within this is disconnected.
    #[serde(default = "default_keepalive_timeout_secs")]
    pub keepalive_timeout_secs: u64,
}

impl Default for ConnectionsSection {
    fn default() -> Self {
        Self {
            max_connections: default_max_connections(),
            max_handshakes: default_max_handshakes(),
            handshake_timeout_secs: default_handshake_timeout_secs(),
            max_connection_age_secs: default_max_connection_age_secs(),
            max_connection_age_grace_secs: default_max_connection_age_grace_secs(),
            keepalive_interval_secs: default_keepalive_interval_secs(),
            keepalive_timeout_secs: default_keepalive_timeout_secs(),
        }
    }
}

impl ConnectionsSection {
    fn check(&self) -> Result<(), ConfigError> {
        let problem = if self.max_connections == 0 {
            "max_connections must be at least 1"
        } else if !(1..=self.max_connections).contains(&self.max_handshakes) {
            "max_handshakes must be within 1 and max_connections"
        } else if !(1..=300).contains(&self.handshake_timeout_secs) {
            "handshake_timeout_secs must be within 1-300"
        } else if !(1..=86_400).contains(&self.max_connection_age_secs) {
            "max_connection_age_secs must be within 1-86400"
        } else if !(1..=3_600).contains(&self.max_connection_age_grace_secs) {
            "max_connection_age_grace_secs must be within 1-3600"
        } else if !(1..=3_600).contains(&self.keepalive_interval_secs) {
            "keepalive_interval_secs must be within 1-3600"
        } else if !(1..=600).contains(&self.keepalive_timeout_secs) {
            "keepalive_timeout_secs must be within 1-600"
        } else {
            return Ok(());
        };
        Err(ConfigError(format!("[connections] {problem}")))
    }
}

fn default_max_connections() -> usize {
    1024
}
fn default_max_handshakes() -> usize {
    64
}
fn default_handshake_timeout_secs() -> u64 {
    10
}
fn default_max_connection_age_secs() -> u64 {
    600
}
fn default_max_connection_age_grace_secs() -> u64 {
    30
}
fn default_keepalive_interval_secs() -> u64 {
    30
}
fn default_keepalive_timeout_secs() -> u64 {
    10
}

/// `[metrics]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsSection {
    /// Address of the plain-HTTP Prometheus endpoint; none if unset.
    pub listen: Option<SocketAddr>,
}

/// `[policy]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySection {
    /// Algorithms keys may be created with, by their API names.
    #[serde(default = "default_allowed_algorithms")]
    pub allowed_algorithms: Vec<String>,
}

impl Default for PolicySection {
    fn default() -> Self {
        Self {
            allowed_algorithms: default_allowed_algorithms(),
        }
    }
}

/// `[audit]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditSection {
    /// Sign a checkpoint after this many records.
    #[serde(default = "default_checkpoint_every")]
    pub checkpoint_every: u64,
    /// ... or after this many seconds with new records.
    #[serde(default = "default_checkpoint_interval_secs")]
    pub checkpoint_interval_secs: u64,
    /// Start a new audit log although the token already holds custody
    /// objects (the data directory was lost): without it custodyd refuses
    /// to start and lists them (threat model F3, the runbook's "Data
    /// directory lost"). The objects are left untouched and unregistered.
    #[serde(default)]
    pub lost_directory_acknowledged: bool,
}

impl Default for AuditSection {
    fn default() -> Self {
        Self {
            checkpoint_every: default_checkpoint_every(),
            checkpoint_interval_secs: default_checkpoint_interval_secs(),
            lost_directory_acknowledged: false,
        }
    }
}

/// `[storage]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageSection {
    /// Free space, in MiB, kept under `data_dir`: below it only reads are
    /// served ([`crate::storage`]). 0 turns the rule off.
    #[serde(default = "default_reserve_mib")]
    pub reserve_mib: u64,
    /// Most memory, in MiB, the database keeps as its page cache.
    #[serde(default = "default_cache_mib")]
    pub cache_mib: u64,
}

impl StorageSection {
    /// [`Self::cache_mib`] in bytes.
    pub fn cache_bytes(&self) -> u64 {
        self.cache_mib.saturating_mul(1024 * 1024)
    }
}

impl Default for StorageSection {
    fn default() -> Self {
        Self {
            reserve_mib: default_reserve_mib(),
            cache_mib: default_cache_mib(),
        }
    }
}

fn default_cache_mib() -> u64 {
    64
}
fn default_reserve_mib() -> u64 {
    256
}
fn default_max_message_bytes() -> usize {
    1024 * 1024
}
fn default_max_concurrent_requests() -> usize {
    1024
}
/// `[hsm] max_queued_per_caller` when the file names none: twice a
/// `SignStream`'s window, so one stream never meets its share alone.
pub const DEFAULT_HSM_SHARE: usize = 256;
fn default_max_queued_per_caller() -> usize {
    DEFAULT_HSM_SHARE
}
fn default_hsm_workers() -> usize {
    hsm_shim::HsmConfig::DEFAULT_WORKERS
}
fn default_max_pin_failures() -> u32 {
    5
}
fn default_max_queued_jobs() -> usize {
    hsm_shim::HsmConfig::DEFAULT_MAX_QUEUED
}
fn default_call_timeout_ms() -> u64 {
    u64::try_from(hsm_shim::HsmConfig::DEFAULT_CALL_TIMEOUT.as_millis()).unwrap_or(30_000)
}
fn default_min_tls() -> String {
    "1.3".into()
}
fn default_checkpoint_every() -> u64 {
    1000
}
fn default_checkpoint_interval_secs() -> u64 {
    60
}
fn default_allowed_algorithms() -> Vec<String> {
    KeyAlgorithm::ALL
        .iter()
        .filter(|a| a.default_allowed())
        .map(|a| a.api_name().to_string())
        .collect()
}

/// A configuration error, naming the file and the field.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

impl Config {
    /// Reads and checks a config file; `credential:NAME` paths name files in
    /// `$CREDENTIALS_DIRECTORY` ([`credentials`]).
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let mut config = Self::load_offline(path)?;
        let credentials = std::env::var_os(credentials::DIRECTORY_VARIABLE).map(PathBuf::from);
        config.resolve_credentials(credentials.as_deref())?;
        Ok(config)
    }

    /// [`Config::load`] for the offline commands, which read no secret
    /// (`--check`, `--reset-pin-lockout`): `credential:NAME` paths are left
    /// as they are, so that these run outside the unit too.
    pub fn load_offline(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("cannot read {}: {e}", path.display())))?;
        let config: Config =
            toml::from_str(&text).map_err(|e| ConfigError(format!("{}: {e}", path.display())))?;
        config.check()?;
        Ok(config)
    }

    /// Checks what serde cannot.
    pub fn check(&self) -> Result<(), ConfigError> {
        self.pin_source()?;
        if !matches!(self.tls.min_version.as_str(), "1.2" | "1.3") {
            return Err(ConfigError(format!(
                "[tls] min_version must be \"1.2\" or \"1.3\", not {:?}",
                self.tls.min_version
            )));
        }
        for name in &self.policy.allowed_algorithms {
            if KeyAlgorithm::from_api_name(name).is_none() {
                return Err(ConfigError(format!(
                    "[policy] allowed_algorithms: unknown algorithm {name:?}"
                )));
            }
        }
        if self.hsm.max_pin_failures == 0 {
            return Err(ConfigError(
                "[hsm] max_pin_failures must be at least 1".into(),
            ));
        }
        if self.hsm.workers == 0 || self.max_concurrent_requests == 0 {
            return Err(ConfigError(
                "[hsm] workers and max_concurrent_requests must be at least 1".into(),
            ));
        }
        let max_call_timeout_ms = hsm_shim::MAX_CALL_TIMEOUT.as_millis();
        if !(1..=max_call_timeout_ms).contains(&u128::from(self.hsm.call_timeout_ms)) {
            return Err(ConfigError(format!(
                "[hsm] call_timeout_ms must be within 1-{max_call_timeout_ms} (a PKCS#11 call's deadline; the default is 30000)"
            )));
        }
        if self.lifecycle.destroy_cancel_window_secs < MIN_DESTROY_CANCEL_WINDOW_SECS {
            return Err(ConfigError(format!(
                "[lifecycle] destroy_cancel_window_secs must be at least {MIN_DESTROY_CANCEL_WINDOW_SECS}: an approved destruction always leaves time to cancel it"
            )));
        }
        if !(8..=65_536).contains(&self.storage.cache_mib) {
            return Err(ConfigError(
                "[storage] cache_mib must be within 8-65536".into(),
            ));
        }
        if self.audit.checkpoint_every == 0 || self.audit.checkpoint_interval_secs == 0 {
            // 0 would have the audit writer sign checkpoints in a loop.
            return Err(ConfigError(
                "[audit] checkpoint_every and checkpoint_interval_secs must be at least 1".into(),
            ));
        }
        if self.lifecycle.scheduler_interval_secs == 0 {
            return Err(ConfigError(
                "[lifecycle] scheduler_interval_secs must be at least 1".into(),
            ));
        }
        if self.lifecycle.clock_step_tolerance_secs == 0 {
            return Err(ConfigError(
                "[lifecycle] clock_step_tolerance_secs must be at least 1: every reading differs from the monotonic clock by a few milliseconds".into(),
            ));
        }
        if !(2..=1 << 32).contains(&self.envelope.max_encryptions_per_version) {
            return Err(ConfigError(
                "[envelope] max_encryptions_per_version must be within 2-4294967296 (2^32, the bound for random GCM nonces)".into(),
            ));
        }
        if self.ceremony.scratch_token_label.is_some() != self.ceremony.scratch_pin_file.is_some() {
            return Err(ConfigError(
                "[ceremony] scratch_token_label and scratch_pin_file go together".into(),
            ));
        }
        self.ceremony.trusted_audit_keys()?;
        self.connections.check()?;
        self.store.check()?;
        if !(10..=86_400).contains(&self.dual_control.approval_ttl_secs) {
            return Err(ConfigError(
                "[dual_control] approval_ttl_secs must be within 10-86400".into(),
            ));
        }
        if self.hsm.max_queued_jobs == 0
            || self.dual_control.max_pending_per_requester == 0
            || self.ceremony.max_open_per_officer == 0
        {
            return Err(ConfigError(
                "[hsm] max_queued_jobs, [dual_control] max_pending_per_requester and [ceremony] max_open_per_officer must be at least 1".into(),
            ));
        }
        // A stream's batch (16) fits in a share.
        if !(16..=1_000_000).contains(&self.hsm.max_queued_per_caller) {
            return Err(ConfigError(
                "[hsm] max_queued_per_caller must be within 16-1000000 (a SignStream batch is 16 requests)".into(),
            ));
        }
        if !(3600..=10 * 365 * 86_400).contains(&self.dual_control.operation_retention_secs) {
            return Err(ConfigError(
                "[dual_control] operation_retention_secs must be within 3600-315360000 (an hour to ten years)".into(),
            ));
        }
        if self.max_message_bytes < 1024 {
            return Err(ConfigError(
                "max_message_bytes must be at least 1024".into(),
            ));
        }
        Ok(())
    }

    /// The PIN source of `[hsm]`.
    pub fn pin_source(&self) -> Result<hsm_shim::PinSource, ConfigError> {
        match (&self.hsm.pin_file, &self.hsm.pin_env) {
            (Some(file), None) => Ok(hsm_shim::PinSource::File(file.clone())),
            (None, Some(var)) => Ok(hsm_shim::PinSource::Env(var.clone())),
            _ => Err(ConfigError(
                "[hsm] needs exactly one of pin_file and pin_env".into(),
            )),
        }
    }

    /// Algorithms allowed by policy.
    pub fn allowed_algorithms(&self) -> Vec<KeyAlgorithm> {
        self.policy
            .allowed_algorithms
            .iter()
            .filter_map(|n| KeyAlgorithm::from_api_name(n))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const REFERENCE: &str = include_str!("../../../deploy/custodyd.toml");

    #[test]
    fn the_reference_config_is_valid_and_complete() {
        let config: Config = toml::from_str(REFERENCE).unwrap();
        config.check().unwrap();
        assert_eq!(config.health.self_test_interval_secs, 30);
        // Its secrets are systemd credentials (the unit's LoadCredential=).
        let mut resolved = config.clone();
        let credentials = Path::new("/run/credentials/custodyd.service");
        resolved.resolve_credentials(Some(credentials)).unwrap();
        assert_eq!(resolved.hsm.pin_file, Some(credentials.join("hsm.pin")));
        assert_eq!(resolved.tls.key, credentials.join("tls.key"));
        assert!(config.clone().resolve_credentials(None).is_err());
        assert_eq!(config.tls.min_version, "1.3");
        assert_eq!(config.allowed_algorithms().len(), 10);
        assert!(config.metrics.listen.is_some());
        assert_eq!(
            config.lifecycle.destroy_cancel_window_ms(),
            24 * 3600 * 1000
        );
        assert_eq!(config.envelope.max_encryptions_per_version, 1 << 32);
        assert_eq!(
            (config.storage.reserve_mib, config.storage.cache_mib),
            (
                StorageSection::default().reserve_mib,
                StorageSection::default().cache_mib
            )
        );
        let connections = &config.connections;
        let defaults = ConnectionsSection::default();
        assert_eq!(
            (
                connections.max_connections,
                connections.max_handshakes,
                connections.handshake_timeout_secs,
                connections.max_connection_age_secs,
                connections.max_connection_age_grace_secs,
                connections.keepalive_interval_secs,
                connections.keepalive_timeout_secs,
            ),
            (
                defaults.max_connections,
                defaults.max_handshakes,
                defaults.handshake_timeout_secs,
                defaults.max_connection_age_secs,
                defaults.max_connection_age_grace_secs,
                defaults.keepalive_interval_secs,
                defaults.keepalive_timeout_secs,
            ),
            "the reference config shows the defaults"
        );
        for (from, to) in [
            (
                "destroy_cancel_window_secs = 86400",
                "destroy_cancel_window_secs = 0",
            ),
            (
                "max_encryptions_per_version = 4294967296",
                "max_encryptions_per_version = 4294967297",
            ),
            (
                "max_encryptions_per_version = 4294967296",
                "max_encryptions_per_version = 1",
            ),
            (
                "scheduler_interval_secs = 60",
                "scheduler_interval_secs = 0",
            ),
            (
                "clock_step_tolerance_secs = 60",
                "clock_step_tolerance_secs = 0",
            ),
            (
                "trusted_audit_keys = []",
                "trusted_audit_keys = [\"not a digest\"]",
            ),
            ("max_connections = 1024", "max_connections = 0"),
            ("max_handshakes = 64", "max_handshakes = 2000"),
            (
                "max_connection_age_secs = 600",
                "max_connection_age_secs = 0",
            ),
            (
                "keepalive_interval_secs = 30",
                "keepalive_interval_secs = 0",
            ),
            ("keepalive_timeout_secs = 10", "keepalive_timeout_secs = 0"),
            ("max_queued_jobs = 1024", "max_queued_jobs = 0"),
            ("max_queued_per_caller = 256", "max_queued_per_caller = 0"),
            ("max_queued_per_caller = 256", "max_queued_per_caller = 15"),
            (
                "max_queued_per_caller = 256",
                "max_queued_per_caller = 1000001",
            ),
            ("call_timeout_ms = 30000", "call_timeout_ms = 0"),
            ("call_timeout_ms = 30000", "call_timeout_ms = 600001"),
            (
                "max_pending_per_requester = 32",
                "max_pending_per_requester = 0",
            ),
            (
                "operation_retention_secs = 2592000",
                "operation_retention_secs = 60",
            ),
            ("max_open_per_officer = 4", "max_open_per_officer = 0"),
            ("checkpoint_every = 1000", "checkpoint_every = 0"),
            ("cache_mib = 64", "cache_mib = 0"),
            (
                "checkpoint_interval_secs = 60",
                "checkpoint_interval_secs = 0",
            ),
        ] {
            assert!(REFERENCE.contains(from), "{from}");
            let config: Config = toml::from_str(&REFERENCE.replace(from, to)).unwrap();
            assert!(config.check().is_err(), "{to} accepted");
        }
        // The share's bounds themselves are accepted.
        for edge in [
            "max_queued_per_caller = 16",
            "max_queued_per_caller = 1000000",
        ] {
            let config: Config =
                toml::from_str(&REFERENCE.replace("max_queued_per_caller = 256", edge)).unwrap();
            config.check().unwrap();
        }
    }

    #[test]
    fn only_a_build_with_crash_points_accepts_a_cancel_window_under_an_hour() {
        // Threat model C27: the one-second minimum exists for the SIGKILL
        // tests' build only; every other build refuses anything under an
        // hour (the test runs in both builds: `cargo test -p custody-core`
        // has no crash points, the workspace's test build has them).
        assert_eq!(min_destroy_cancel_window_secs(false), 3600);
        assert_eq!(min_destroy_cancel_window_secs(true), 1);
        let short = REFERENCE.replace(
            "destroy_cancel_window_secs = 86400",
            "destroy_cancel_window_secs = 2",
        );
        let config: Config = toml::from_str(&short).unwrap();
        assert_eq!(
            config.check().is_ok(),
            crate::failpoint::COMPILED_IN,
            "a 2 s cancel window in a build with crash points compiled in: {}",
            crate::failpoint::COMPILED_IN
        );
        let hour = REFERENCE.replace(
            "destroy_cancel_window_secs = 86400",
            "destroy_cancel_window_secs = 3600",
        );
        let config: Config = toml::from_str(&hour).unwrap();
        config.check().unwrap();
    }

    #[test]
    fn trusted_audit_keys_are_sha256_digests() {
        let config: Config = toml::from_str(REFERENCE).unwrap();
        assert!(config.ceremony.trusted_audit_keys().unwrap().is_empty());
        let pinned = REFERENCE.replace(
            "trusted_audit_keys = []",
            &format!(
                "trusted_audit_keys = [\"{}\", \"{}\"]",
                "ab".repeat(32),
                "CD".repeat(32)
            ),
        );
        let config: Config = toml::from_str(&pinned).unwrap();
        config.check().unwrap();
        assert_eq!(
            config.ceremony.trusted_audit_keys().unwrap(),
            [[0xab; 32], [0xcd; 32]]
        );
        for bad in ["ab".repeat(31), "ab".repeat(33), "xy".repeat(32)] {
            let config: Config = toml::from_str(&REFERENCE.replace(
                "trusted_audit_keys = []",
                &format!("trusted_audit_keys = [\"{bad}\"]"),
            ))
            .unwrap();
            let err = config.check().unwrap_err().to_string();
            assert!(
                err.contains("trusted_audit_keys") && err.contains(&bad),
                "{err}"
            );
        }
    }

    #[test]
    fn an_etcd_store_needs_its_replica_id_endpoints_and_mutual_tls() {
        let etcd = REFERENCE
            .replace("backend = \"sled\"", "backend = \"etcd\"")
            .replace("# replica_id", "replica_id")
            .replace("# endpoints", "endpoints")
            .replace("# ca = ", "ca = ")
            .replace("# cert = ", "cert = ")
            .replace("# key = ", "key = ");
        let config: Config = toml::from_str(&etcd).unwrap();
        config.check().unwrap();
        assert_eq!(config.store.backend, StoreBackend::Etcd);
        for (from, to, named) in [
            ("replica_id = \"custodyd-a\"", "", "needs a replica_id"),
            (
                "replica_id = \"custodyd-a\"",
                "replica_id = \"a b\"",
                "replica_id must be",
            ),
            (
                "key = \"/etc/custody/etcd-client.key\"",
                "",
                "needs ca, cert and key",
            ),
            (
                "https://10.0.0.11:2379",
                "http://10.0.0.11:2379",
                "must be https://",
            ),
        ] {
            let config: Config = toml::from_str(&etcd.replace(from, to)).unwrap();
            let error = config.check().unwrap_err().to_string();
            assert!(error.contains(named), "{from} -> {to}: {error}");
        }
        // etcd settings on the sled backend are a mistake, not ignored.
        let stray = REFERENCE.replace("# endpoints", "endpoints");
        let config: Config = toml::from_str(&stray).unwrap();
        let error = config.check().unwrap_err().to_string();
        assert!(error.contains("are for backend = \"etcd\""), "{error}");
    }

    #[test]
    fn unknown_fields_and_ambiguous_pins_are_refused() {
        let typo = REFERENCE.replace("workers = 2", "wrokers = 2");
        let err = toml::from_str::<Config>(&typo).unwrap_err().to_string();
        assert!(err.contains("wrokers"), "{err}");

        let both = REFERENCE.replace("# pin_env = ", "pin_env = ");
        let config: Config = toml::from_str(&both).unwrap();
        assert!(
            config
                .check()
                .unwrap_err()
                .to_string()
                .contains("exactly one")
        );

        let tls = REFERENCE.replace("min_version = \"1.3\"", "min_version = \"1.1\"");
        let config: Config = toml::from_str(&tls).unwrap();
        assert!(config.check().is_err());

        let policy = REFERENCE.replace("\"EC_SIGN_ED25519\",", "\"EC_SIGN_ED448\",");
        let config: Config = toml::from_str(&policy).unwrap();
        assert!(
            config
                .check()
                .unwrap_err()
                .to_string()
                .contains("EC_SIGN_ED448")
        );
    }
}
