//! Assembles and runs the gRPC server: services, health, reflection, limits,
//! mTLS listener, graceful shutdown.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use custody_proto::v1::audit_service_server::AuditServiceServer;
use custody_proto::v1::ceremony_service_server::CeremonyServiceServer;
use custody_proto::v1::envelope_service_server::EnvelopeServiceServer;
use custody_proto::v1::key_service_server::KeyServiceServer;
use custody_proto::v1::operation_service_server::OperationServiceServer;
use custody_proto::v1::signing_service_server::SigningServiceServer;
use hsm_shim::{Hsm, HsmConfig, TokenSelector};
use tokio::net::TcpListener;

use crate::gate::GateLayer;
use crate::listener::{Limits, incoming};
use crate::service::audit::Audit;
use crate::service::ceremony::CeremonyKeys;
use crate::service::envelope::EnvelopeKeys;
use crate::service::keys::Keys;
use crate::service::operations::Operations;
use crate::service::signing::Signing;
use crate::tls::TlsReloader;
use custody_core::Custody;
use custody_core::audit::{AuditLog, CheckpointPolicy, Event};
use custody_core::clock::{Clock, GuardedClock, SystemClock};
use custody_core::config::{Config, StoreBackend};
use custody_core::dual_control::store::{DualControlStore, Genesis};
use custody_core::metrics;
use custody_core::pin_lockout;
use custody_core::registry::Registry;

/// Everything custodyd holds while it runs.
pub struct Daemon {
    /// Shared service state.
    pub state: Arc<Custody>,
    /// The TLS acceptor (reloaded on SIGHUP).
    pub tls: Arc<TlsReloader>,
    /// This replica's hold on its `[store] replica_id`, kept while it runs.
    pub replica: Option<custody_store::Claim>,
    config: Config,
    /// The signing self-test key's public key (SubjectPublicKeyInfo DER).
    self_test_key: Vec<u8>,
    /// How long each phase of this start took.
    pub start_phases: crate::phases::StartPhases,
}

impl Daemon {
    /// Opens the HSM, the database (registry and audit log) and the TLS files.
    /// Any failure stops the start with a message that names what to fix.
    pub async fn open(config: Config) -> Result<Daemon, String> {
        Self::open_with_clock(config, Arc::new(SystemClock)).await
    }

    /// [`Daemon::open`] with the clock approvals expire by (tests inject one).
    pub async fn open_with_clock(config: Config, clock: Arc<dyn Clock>) -> Result<Daemon, String> {
        let mut phases = crate::phases::StartPhases::new();
        crate::metrics_http::start(config.metrics.listen)?;
        let tls = TlsReloader::new(config.tls.clone())?;
        phases.done("tls");
        let db = open_store(&config)?;
        phases.done("store");
        let records = audit_records(&config, &db)?;
        phases.done("audit_records");
        // Who takes this process's claims and locks in the store.
        let holder = config.store.replica_id.as_deref().unwrap_or("custodyd");
        let epochs =
            custody_core::shared::Epochs::open(&db, holder).map_err(|e| format!("store: {e}"))?;
        let replica = claim_replica(&config, &db, &epochs)?;
        // Every tree checked before anything reads or writes one (F1), the
        // audit chain from its last checkpoint (Q1); the audit log opens
        // with this pass's chain.
        // The registry's epoch before the check reads the keys: a change
        // another replica makes meanwhile leaves the copy behind the store,
        // to be reloaded, never ahead of it.
        let registry_epoch = epochs
            .read(custody_core::shared::Domain::Registry)
            .map_err(|e| format!("store: {e}"))?;
        phases.done("epochs");
        let (chain, checked_keys) = custody_core::integrity::check_at_start(&db, &records)
            .into_checked(&config.data_dir)?;
        phases.done("check");
        // Every rule decides by the guarded clock: never backwards, even
        // across a restart, and steps reported (threat model F7).
        let clock: Arc<dyn Clock> = Arc::new(GuardedClock::open(
            &db,
            clock,
            config.lifecycle.clock_step_tolerance_ms(),
            config.store.replica_id.as_deref(),
        )?);
        phases.done("clock");
        let earlier_failures = pin_lockout::check(&db, config.hsm.max_pin_failures)?;
        let pin = config
            .pin_source()
            .map_err(|e| e.to_string())?
            .load()
            .map_err(|e| e.to_string())?;
        let mut hsm_config = HsmConfig::new(
            config.hsm.module.clone(),
            TokenSelector::Label(config.hsm.token_label.clone()),
            pin,
        );
        hsm_config.workers = config.hsm.workers;
        hsm_config.max_queued = config.hsm.max_queued_jobs;
        hsm_config.call_timeout = Duration::from_millis(config.hsm.call_timeout_ms);
        let hsm = match Hsm::open(hsm_config) {
            Ok(hsm) => hsm,
            Err(e) if e.kind() == hsm_shim::ErrorKind::Authentication => {
                let count = pin_lockout::record_failure(&db)?;
                return Err(format!(
                    "HSM: {e}; failed login {count} of {} before custodyd stops trying",
                    config.hsm.max_pin_failures
                ));
            }
            Err(e) => return Err(format!("HSM: {e}")),
        };
        pin_lockout::reset(&db)?;
        phases.done("hsm");
        // Replicas starting together on an empty store: one at a time
        // checks the token against the log, makes the audit key if there is
        // none, and records its start; the next then finds both.
        let first_start = db
            .campaign("first-start", holder, REPLICA_CLAIM_TTL)
            .await
            .map_err(|e| format!("store: the start's claim: {e}"))?;
        phases.done("first_start_claim");
        let started_before =
            !chain.is_empty() || records.holds_records().map_err(|e| format!("store: {e}"))?;
        let left = if started_before {
            None
        } else {
            lost_directory(&config, &chain, &hsm).await?
        };
        let registry = Registry::from_checked(&db, &epochs, registry_epoch, checked_keys)
            .map_err(|e| e.to_string())?;
        phases.done("registry");
        let audit = AuditLog::open(
            &db,
            &records,
            &chain,
            &hsm,
            CheckpointPolicy {
                every: config.audit.checkpoint_every,
                interval: Duration::from_secs(config.audit.checkpoint_interval_secs),
            },
            config.store.replica_id.clone(),
        )
        .map_err(|e| format!("audit log: {e}"))?;
        phases.done("audit_open");
        let previous_stop = if matches!(audit.last_event(), Some(Event::DaemonStopped { .. })) {
            custody_core::ceremonies::PreviousStop::Clean
        } else {
            custody_core::ceremonies::PreviousStop::CrashOrKill
        };
        // What this start did to the log's files before the log opened (a
        // move, a torn tail cut), recorded before anything else (Q8).
        custody_core::audit::record_file_repairs(&audit, &db)
            .await
            .map_err(|e| format!("audit log: {e}"))?;
        if let Some(left) = &left {
            audit
                .append(left.event(&hsm.token().label))
                .await
                .map_err(|e| e.to_string())?;
            tracing::warn!(
                objects = left.objects,
                "a new audit log starts over a token holding custody objects from a lost data directory; they are left untouched and unregistered"
            );
        }
        let fingerprint = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(
            audit.audit_key_spki(),
        ));
        audit
            .append(Event::DaemonStarted {
                version: env!("CARGO_PKG_VERSION").into(),
                token: hsm.token().label.clone(),
                audit_key_sha256: fingerprint.clone(),
                failed_logins_before: earlier_failures,
            })
            .await
            .map_err(|e| e.to_string())?;
        // The self-test key is made with the audit key (under the start's
        // claim), and custodyd serves nothing unless it signs (FIPS 140's
        // self-test rule).
        phases.done("audit_started");
        let self_test_key = custody_core::readiness::ensure_key(&hsm).await?;
        custody_core::readiness::self_test(&hsm, &self_test_key)
            .await
            .map_err(|e| format!("signing self-test at start: {e}"))?;
        metrics::self_test("ok");
        phases.done("self_test");
        drop(first_start);
        tracing::info!(
            keys = registry.len(),
            audit_key_sha256 = %fingerprint,
            "custodyd ready"
        );
        let dual_control = DualControlStore::open(&db, &epochs)?;
        if let Some(path) = &config.dual_control.genesis_file {
            let genesis = Genesis::load(path)?;
            if dual_control
                .apply_genesis(&genesis, clock.now_ms())
                .await
                .map_err(|e| e.to_string())?
            {
                audit
                    .append(Event::OfficersGenesis {
                        officers: genesis
                            .officers
                            .iter()
                            .map(|o| format!("{} {} {}", o.id, o.principal, o.public_key))
                            .collect(),
                        required: genesis.required,
                    })
                    .await
                    .map_err(|e| e.to_string())?;
                tracing::info!(
                    officers = genesis.officers.len(),
                    required = genesis.required,
                    "officer genesis applied"
                );
            }
        }
        let budget = custody_core::budget::NonceBudget::open(
            &db,
            config.envelope.max_encryptions_per_version,
        )?;
        let ceremonies = ceremonies(&config, &db)?;
        let state = Arc::new(Custody {
            hsm,
            registry,
            audit,
            allowed_algorithms: config.allowed_algorithms(),
            dual_control,
            approval_ttl_ms: i64::try_from(config.dual_control.approval_ttl_secs).unwrap_or(600)
                * 1000,
            denial_vetoes: config.dual_control.denial_vetoes,
            clock,
            lifecycle: config.lifecycle.clone(),
            budget,
            ceremonies,
            limits: custody_core::limits::Limits::from_config(&config),
            headroom: custody_core::storage::Headroom::new(
                config.data_dir.clone(),
                config.storage.reserve_mib.saturating_mul(1024 * 1024),
            ),
            shared: epochs,
        });
        // Work a stop interrupted is rolled back only by a replica that
        // starts alone: with others alive, a pending version or an open
        // ceremony may be one they are making right now.
        let others = state
            .shared
            .others(config.store.replica_id.as_deref())
            .map_err(|e| format!("store: listing the replicas: {e}"))?;
        phases.done("state");
        if others.is_empty() {
            recover(&state, previous_stop).await?;
        } else {
            tracing::warn!(
                others = %others.join(", "),
                "other replicas are running: start-up recovery is left to a replica that starts alone"
            );
        }
        phases.done("recover");
        tracing::info!(phases = %phases.describe(), "custodyd start-up phases");
        Ok(Daemon {
            state,
            tls,
            replica,
            config,
            self_test_key,
            start_phases: phases,
        })
    }

    /// Serves on `listener` until `shutdown` completes, then lets in-flight
    /// requests finish.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = &'static str> + Send + 'static,
    ) -> Result<(), String> {
        // What stopped the server (the signal's name), for the audit log.
        // A replica that lost its id (the store stopped hearing from it for
        // longer than the claim's lease, so another custodyd may take the
        // id) stops too; the claim is kept until the last request is done.
        let (stopped_by, why) = tokio::sync::oneshot::channel();
        let replica = self.replica.map(Arc::new);
        let held = replica.clone();
        // Cancelled as the stop begins: the accept loop stops taking
        // connections that tonic, draining, would never read.
        let stopping = tokio_util::sync::CancellationToken::new();
        let accepting = stopping.clone();
        let shutdown = async move {
            let why = tokio::select! {
                why = shutdown => why,
                () = replica_lost(held) => {
                    tracing::error!("this replica's replica_id claim lapsed; stopping");
                    "replica_id lost"
                }
            };
            stopping.cancel();
            let _ = stopped_by.send(why);
        };
        let limit = self.config.max_message_bytes;
        let (health_reporter, health) = tonic_health::server::health_reporter();
        crate::health::start(&health_reporter).await;
        let signed = Arc::new(std::sync::atomic::AtomicBool::new(true));
        tokio::spawn(crate::health::self_tests(
            Arc::downgrade(&self.state),
            self.self_test_key,
            Duration::from_secs(self.config.health.self_test_interval_secs),
            signed.clone(),
        ));
        tokio::spawn(crate::health::watch(
            Arc::downgrade(&self.state),
            health_reporter,
            signed,
        ));
        tokio::spawn(custody_core::scheduler::run(Arc::downgrade(&self.state)));
        // Server reflection in both versions: grpc.reflection.v1, and
        // v1alpha for the clients that still speak only it (the Python
        // grpcio-reflection descriptor database, older grpcurl).
        let reflection = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(custody_proto::v1::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        };
        let reflection_v1alpha = reflection()
            .build_v1alpha()
            .map_err(|e| format!("reflection: {e}"))?;
        let reflection = reflection()
            .build_v1()
            .map_err(|e| format!("reflection: {e}"))?;
        let state = self.state;
        let gate = GateLayer::new(state.clone(), limit)?;
        let connections = &self.config.connections;
        let secs = Duration::from_secs;
        let served = tonic::transport::Server::builder()
            .concurrency_limit_per_connection(self.config.max_concurrent_requests)
            .timeout(Duration::from_secs(60))
            // A connection's certificate is checked at its handshake (and
            // again at reloads): a maximum age bounds how long it serves
            // without a new handshake.
            .max_connection_age(secs(connections.max_connection_age_secs))
            .max_connection_age_grace(secs(connections.max_connection_age_grace_secs))
            .http2_keepalive_interval(Some(secs(connections.keepalive_interval_secs)))
            .http2_keepalive_timeout(Some(secs(connections.keepalive_timeout_secs)))
            .layer(gate)
            .add_service(health)
            .add_service(reflection)
            .add_service(reflection_v1alpha)
            .add_service(
                KeyServiceServer::new(Keys(state.clone()))
                    .max_decoding_message_size(limit)
                    .max_encoding_message_size(limit),
            )
            .add_service(
                SigningServiceServer::new(Signing(state.clone()))
                    .max_decoding_message_size(limit)
                    .max_encoding_message_size(limit),
            )
            .add_service(
                OperationServiceServer::new(Operations(state.clone()))
                    .max_decoding_message_size(limit)
                    .max_encoding_message_size(limit),
            )
            .add_service(
                EnvelopeServiceServer::new(EnvelopeKeys(state.clone()))
                    .max_decoding_message_size(limit)
                    .max_encoding_message_size(limit),
            )
            .add_service(
                CeremonyServiceServer::new(CeremonyKeys(state.clone()))
                    .max_decoding_message_size(limit)
                    .max_encoding_message_size(limit),
            )
            .add_service(
                AuditServiceServer::new(Audit(state.clone())).max_decoding_message_size(limit),
            )
            .serve_with_incoming_shutdown(
                incoming(listener, self.tls, Limits::from(connections), accepting),
                shutdown,
            )
            .await
            .map_err(|e| format!("gRPC server: {e}"));
        // Every request has finished: record how custodyd stopped (so that
        // the next start knows it was no crash), then let the audit writer
        // drain and stop.
        if let Ok(signal) = why.await {
            if let Err(error) = state
                .audit
                .append(Event::DaemonStopped {
                    signal: signal.into(),
                })
                .await
            {
                tracing::error!(%error, "the stop could not be recorded");
            }
        }
        state.audit.close();
        drop(replica);
        served
    }
}

/// Rolls back what a stop interrupted: version generations, ceremonies,
/// and the objects a kill inside an HSM call left half-made.
async fn recover(
    state: &Custody,
    previous_stop: custody_core::ceremonies::PreviousStop,
) -> Result<(), String> {
    let versions = custody_core::scheduler::roll_back_abandoned(state).await?;
    let ceremonies = custody_core::ceremonies::recover(state, previous_stop)
        .await
        .map_err(|e| format!("ceremony recovery: {e}"))?;
    if ceremonies > 0 {
        tracing::warn!(
            ceremonies,
            stop = %previous_stop,
            "ceremonies interrupted when custodyd stopped were rolled back"
        );
    }
    if versions + ceremonies > 0 {
        custody_core::scheduler::sweep_torn_objects(state).await?;
    }
    Ok(())
}

/// Resolves when `claim` stops counting; never without one.
async fn replica_lost(claim: Option<Arc<custody_store::Claim>>) {
    match claim {
        Some(claim) => claim.lost().await,
        None => std::future::pending().await,
    }
}

/// A new audit log over a token that already holds custody objects (the
/// data directory was lost while the token survived, threat model F3):
/// refused, listing them, unless `[audit] lost_directory_acknowledged`;
/// with it, what the first record reports. Lists the token only when the
/// log is empty. Runs before the audit log opens, which would otherwise
/// take up the token's audit key.
async fn lost_directory(
    config: &Config,
    chain: &custody_core::audit::CheckedChain,
    hsm: &Hsm,
) -> Result<Option<custody_core::integrity::LeftOnToken>, String> {
    if !chain.is_empty() {
        return Ok(None);
    }
    let objects = hsm
        .run(|session| session.inventory())
        .await
        .map_err(|e| format!("HSM: listing the token: {e}"))?;
    let left = custody_core::integrity::left_on_token(
        chain,
        objects.iter().map(|object| object.label.as_str()),
    );
    match left {
        Some(left) if !config.audit.lost_directory_acknowledged => {
            Err(left.refusal(&config.data_dir, &hsm.token().label))
        }
        left => Ok(left),
    }
}

/// The ceremony engine: its journal, the SO PIN if KEK ceremonies are
/// allowed, the scratch token if drills are, and the audit keys pinned for
/// restores.
fn ceremonies(
    config: &Config,
    db: &custody_store::Store,
) -> Result<custody_core::ceremony::state::Ceremonies, String> {
    let journal = custody_core::ceremony::journal::Journal::open(db).map_err(|e| e.to_string())?;
    let so_pin = config
        .ceremony
        .so_pin_file
        .as_ref()
        .map(|path| hsm_shim::PinSource::File(path.clone()).load())
        .transpose()
        .map_err(|e| format!("[ceremony] so_pin_file: {e}"))?;
    let scratch = match (
        &config.ceremony.scratch_token_label,
        &config.ceremony.scratch_pin_file,
    ) {
        (Some(label), Some(pin_file)) => {
            let pin = hsm_shim::PinSource::File(pin_file.clone())
                .load()
                .map_err(|e| format!("[ceremony] scratch_pin_file: {e}"))?;
            let mut scratch = HsmConfig::new(
                config.hsm.module.clone(),
                TokenSelector::Label(label.clone()),
                pin,
            );
            scratch.workers = 1;
            Some(scratch)
        }
        _ => None,
    };
    let trusted_audit_keys = config
        .ceremony
        .trusted_audit_keys()
        .map_err(|e| e.to_string())?;
    Ok(
        custody_core::ceremony::state::Ceremonies::new(journal, so_pin, scratch)
            .with_trusted_audit_keys(trusted_audit_keys),
    )
}

/// How long a replica id outlives a replica that died without releasing it.
pub const REPLICA_CLAIM_TTL: Duration = Duration::from_secs(10);

/// Opens the store `[store]` names: sled in `data_dir`, or the etcd
/// cluster (refused clearly if no member answers). `data_dir` is made
/// either way: it holds custodyd's local files.
pub fn open_store(config: &Config) -> Result<custody_store::Store, String> {
    let store = &config.store;
    match store.backend {
        StoreBackend::Sled => open_db(&config.data_dir, config.storage.cache_bytes()),
        StoreBackend::Etcd => {
            make_private_dir(&config.data_dir)?;
            let (Some(ca), Some(cert), Some(key)) = (&store.ca, &store.cert, &store.key) else {
                return Err("[store] backend = \"etcd\" needs ca, cert and key".into());
            };
            let mut etcd = custody_store::EtcdConfig::new(
                store.endpoints.clone(),
                ca.clone(),
                cert.clone(),
                key.clone(),
            );
            if let Some(prefix) = &store.prefix {
                etcd.prefix = prefix.clone();
            }
            if let Some(ms) = store.request_timeout_ms {
                etcd.request_timeout = Duration::from_millis(ms);
            }
            custody_store::Store::open_etcd(&etcd)
                .map_err(|e| format!("[store] etcd at {}: {e}", store.endpoints.join(", ")))
        }
    }
}

/// Takes this replica's `[store] replica_id` in the store, refusing to
/// start if another custodyd holds it: two replicas under one name would
/// make the audit log's `replica` meaningless.
fn claim_replica(
    config: &Config,
    db: &custody_store::Store,
    epochs: &custody_core::shared::Epochs,
) -> Result<Option<custody_store::Claim>, String> {
    let Some(id) = &config.store.replica_id else {
        return Ok(None);
    };
    let holder = epochs.replica_claim_holder(&config.listen.to_string());
    match db.claim(&format!("replica/{id}"), &holder, REPLICA_CLAIM_TTL) {
        Ok(claim) => Ok(Some(claim)),
        Err(custody_store::ClaimError::Held { holder }) => Err(format!(
            "[store] replica_id {id:?} is in use by another custodyd ({holder}); give each replica its own id (the id of a replica that died frees itself within {} s)",
            REPLICA_CLAIM_TTL.as_secs()
        )),
        Err(custody_store::ClaimError::Store(e)) => {
            Err(format!("[store] claiming replica_id {id:?}: {e}"))
        }
    }
}

fn make_private_dir(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).map_err(|e| format!("data dir {}: {e}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| format!("data dir {}: {e}", dir.display()))
}

/// Where the audit records lie (threat model Q5): with the embedded
/// store, a segment log of their own in the data directory (a directory
/// written before segments is moved into one first, and a torn tail a
/// crash left is cut); with etcd, the shared store, which every replica
/// appends to.
fn audit_records(
    config: &Config,
    db: &custody_store::Store,
) -> Result<custody_core::audit::RecordHome, String> {
    match config.store.backend {
        StoreBackend::Sled => custody_core::audit::open_segments_for_writing(
            db,
            &config.data_dir,
            &mut move_reporter(),
        )
        .map_err(|e| format!("audit log: {e}")),
        StoreBackend::Etcd => Ok(custody_core::audit::RecordHome::Store(db.clone())),
    }
}

/// Tells systemd how a move of the audit log out of the database goes (it
/// reads every record, threat model Q7): at its start and then at most
/// every [`MOVE_REPORT_EVERY`], each time asking [`MOVE_EXTENDS_START_BY`]
/// more before the start timeout. A move that stops making progress stops
/// asking, and the unit's own timeout applies.
fn move_reporter() -> impl FnMut(custody_core::audit::MoveProgress) {
    let mut last_report: Option<std::time::Instant> = None;
    move |progress| {
        if last_report.is_some_and(|at| at.elapsed() < MOVE_REPORT_EVERY) {
            return;
        }
        last_report = Some(std::time::Instant::now());
        crate::notify::still_starting(
            MOVE_EXTENDS_START_BY,
            &format!(
                "starting: moving the audit log out of the database, {} of {} records copied, {} checked",
                progress.copied, progress.records, progress.checked
            ),
        );
    }
}

/// How often a move of the audit log reports its progress to systemd.
const MOVE_REPORT_EVERY: Duration = Duration::from_secs(5);

/// How much longer each report asks systemd to wait for the start.
const MOVE_EXTENDS_START_BY: Duration = Duration::from_secs(30);

/// Opens custodyd's database in `dir`, which is made (or narrowed to)
/// mode 0700 first: it holds the registry, the operations and the audit log.
/// Its page cache holds at most `cache_bytes`: sled's own default (1 GiB)
/// would have the append-only audit log grow custodyd's memory by what it
/// writes, up to that size.
pub fn open_db(dir: &Path, cache_bytes: u64) -> Result<custody_store::Store, String> {
    make_private_dir(dir)?;
    custody_store::Store::open_sled(&dir.join("custody.sled"), cache_bytes)
        .map_err(|e| format!("database in {}: {e}", dir.display()))
}
