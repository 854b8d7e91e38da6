//! [`Hsm`]: one PKCS#11 module and token per process, served by worker threads.
//!
//! `C_Initialize` may run once per process, so modules are loaded into a
//! process-wide table and shared. Each worker thread owns one logged-in
//! [`HsmSession`] for its whole life; async callers hand it a closure through
//! [`Hsm::run`] and await the answer, so no session ever crosses an `.await`.
//! One extra session is held open for the life of the `Hsm`: closing the last
//! session of an application logs it out, and a worker reopening its session
//! must not log everyone else out.
//!
//! Why worker threads, and why two: `docs/architecture.md` and
//! `docs/benchmarks.md`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CryptokiError, RvError};
use cryptoki::session::Session;
use cryptoki::slot::Slot;
use tokio::sync::oneshot;

use crate::config::{HsmConfig, TokenSelector};
use crate::error::{ErrorKind, HsmError, Result};
use crate::fault::Faults;
use crate::session::{HandleCache, HsmSession, TokenAccess};
use crate::types::TokenSummary;

type Job = Box<dyn FnOnce(&mut HsmSession) + Send>;

/// A handle to the HSM; cheap to clone, shared by all tasks of the process.
#[derive(Clone)]
pub struct Hsm {
    inner: Arc<Inner>,
}

struct Inner {
    access: Arc<TokenAccess>,
    token: TokenSummary,
    jobs: Option<Sender<Job>>,
    workers: Vec<JoinHandle<()>>,
    // Holds the application's login; see the module docs.
    #[cfg_attr(
        not(feature = "fault-injection"),
        expect(dead_code, reason = "held, not read: it keeps the login alive")
    )]
    login_session: Mutex<Session>,
}

impl std::fmt::Debug for Hsm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hsm")
            .field("token", &self.inner.token)
            .field("workers", &self.inner.workers.len())
            .finish()
    }
}

impl Hsm {
    /// Loads the module (once per process), finds the token, logs in, and
    /// starts `config.workers` worker threads with a session each.
    pub fn open(config: HsmConfig) -> Result<Hsm> {
        if config.workers == 0 {
            return Err(HsmError::new(
                ErrorKind::Configuration,
                "at least one HSM worker is needed",
            ));
        }
        let ctx = load_module(&config.module)?;
        let (slot, token) = find_token(&ctx, &config.token)?;
        let access = Arc::new(TokenAccess {
            ctx,
            slot,
            pin: config.pin,
            cache: HandleCache::default(),
            faults: Faults::default(),
        });
        let login_session = access.open_logged_in()?;
        let (jobs, queue) = crossbeam_channel::unbounded::<Job>();
        let mut workers = Vec::with_capacity(config.workers);
        for index in 0..config.workers {
            let session = HsmSession::new(access.clone(), access.open_logged_in()?);
            let queue = queue.clone();
            let worker = std::thread::Builder::new()
                .name(format!("hsm-worker-{index}"))
                .spawn(move || serve(session, queue))
                .map_err(|e| {
                    HsmError::new(ErrorKind::Internal, format!("starting HSM worker: {e}"))
                })?;
            workers.push(worker);
        }
        tracing::info!(
            token = %token.label,
            serial = %token.serial,
            model = %token.model,
            workers = config.workers,
            "HSM open"
        );
        Ok(Hsm {
            inner: Arc::new(Inner {
                access,
                token,
                jobs: Some(jobs),
                workers,
                login_session: Mutex::new(login_session),
            }),
        })
    }

    /// Runs `op` on a worker's session and returns its result. The closure
    /// owns what it needs (`'static`): the worker may outlive the caller's
    /// stack frame, for example if the caller's future is dropped.
    pub async fn run<T, F>(&self, op: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut HsmSession) -> Result<T> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let job: Job = Box::new(move |session| {
            // The caller may have gone away; its answer is then simply dropped.
            let _ = reply.send(op(session));
        });
        self.inner
            .jobs
            .as_ref()
            .and_then(|jobs| jobs.send(job).ok())
            .ok_or_else(|| HsmError::new(ErrorKind::Unavailable, "HSM workers have stopped"))?;
        answer.await.map_err(|_| {
            HsmError::new(
                ErrorKind::Internal,
                "an HSM worker dropped the request (it panicked; see the log)",
            )
        })?
    }

    /// A session of its own for a caller that owns a thread (a CLI, a
    /// benchmark's baseline). Async code uses [`Hsm::run`] instead.
    pub fn session(&self) -> Result<HsmSession> {
        let session = self.inner.access.open_logged_in()?;
        Ok(HsmSession::new(self.inner.access.clone(), session))
    }

    /// What the token says about itself.
    pub fn token(&self) -> &TokenSummary {
        &self.inner.token
    }

    /// Number of worker threads.
    pub fn workers(&self) -> usize {
        self.inner.workers.len()
    }

    /// Requests waiting for a worker (a gauge for metrics).
    pub fn queued(&self) -> usize {
        self.inner.jobs.as_ref().map_or(0, Sender::len)
    }

    /// The fault plan of this HSM, for tests of failure handling.
    #[cfg(feature = "fault-injection")]
    pub fn faults(&self) -> &crate::fault::FaultInjector {
        &self.inner.access.faults.injector
    }

    /// Logs the application out of the token, as an operator's tool or a
    /// token reset would: every session drops to public access. For tests of
    /// re-login.
    #[cfg(feature = "fault-injection")]
    pub fn log_out_behind_our_back(&self) -> Result<()> {
        let session = self
            .inner
            .login_session
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        session
            .logout()
            .map_err(|e| HsmError::from_cryptoki("logging out", e))
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing the queue ends each worker's loop once it drains.
        self.jobs.take();
        let me = std::thread::current().id();
        for worker in self.workers.drain(..) {
            // The last handle may be dropped by a job on a worker itself.
            if worker.thread().id() != me && worker.join().is_err() {
                tracing::error!("an HSM worker panicked while stopping");
            }
        }
        // `login_session` is dropped after this, once the workers' sessions
        // are closed, so the application stays logged in until the end.
    }
}

fn serve(mut session: HsmSession, queue: Receiver<Job>) {
    while let Ok(job) = queue.recv() {
        // A panicking job must not take the worker (and its session) down: the
        // caller sees its reply channel dropped and reports an internal error.
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(&mut session)));
        if outcome.is_err() {
            tracing::error!("an HSM job panicked; the worker carries on");
        }
    }
}

/// Loads and initialises `path` once per process and returns the shared context.
pub(crate) fn load_module(path: &Path) -> Result<Pkcs11> {
    static MODULES: OnceLock<Mutex<HashMap<PathBuf, Pkcs11>>> = OnceLock::new();
    let mut modules = MODULES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    if let Some(ctx) = modules.get(path) {
        return Ok(ctx.clone());
    }
    let context = |what: &str| format!("{what} PKCS#11 module {}", path.display());
    let ctx = Pkcs11::new(path).map_err(|e| HsmError::from_cryptoki(context("loading"), e))?;
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        // Another component of the process initialised it already: share it.
        Ok(()) | Err(CryptokiError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => return Err(HsmError::from_cryptoki(context("initialising"), e)),
    }
    modules.insert(path.to_path_buf(), ctx.clone());
    Ok(ctx)
}

pub(crate) fn find_token(ctx: &Pkcs11, selector: &TokenSelector) -> Result<(Slot, TokenSummary)> {
    let slots = ctx
        .get_slots_with_initialized_token()
        .map_err(|e| HsmError::from_cryptoki("listing token slots", e))?;
    let mut seen = Vec::new();
    for slot in slots {
        let info = ctx
            .get_token_info(slot)
            .map_err(|e| HsmError::from_cryptoki("reading token info", e))?;
        let summary = TokenSummary {
            label: info.label().trim_end().to_string(),
            serial: info.serial_number().trim_end().to_string(),
            manufacturer: info.manufacturer_id().trim_end().to_string(),
            model: info.model().trim_end().to_string(),
        };
        let matches = match selector {
            TokenSelector::Label(label) => summary.label == *label,
            TokenSelector::Serial(serial) => summary.serial == *serial,
        };
        if matches {
            return Ok((slot, summary));
        }
        seen.push(format!("{:?} (serial {})", summary.label, summary.serial));
    }
    Err(HsmError::new(
        ErrorKind::Configuration,
        format!(
            "no initialised token matches {selector:?}; tokens present: {}",
            if seen.is_empty() {
                "none".to_string()
            } else {
                seen.join(", ")
            }
        ),
    ))
}
