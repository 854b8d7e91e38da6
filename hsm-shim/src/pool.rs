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
//! The workers pass through a `Gate` for each job, so that the pool can be
//! paused: the one operation that must change who is logged in
//! ([`Hsm::create_trusted_kek`], see [`crate::security_officer`]) waits for
//! running jobs to finish and keeps new ones queued until the user is logged
//! in again. Login state is per application, not per session, so without the
//! pause a worker's job would run logged out or, worse, as the SO.
//!
//! Why worker threads, and why two: `docs/architecture.md` and
//! `docs/benchmarks.md`.

use std::cell::Cell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
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
    gate: Arc<Gate>,
    /// Jobs queued and not yet taken by a worker (of both [`Hsm::run`] and
    /// [`Hsm::try_run`]); `try_run` refuses at `max_queued`.
    waiting: Arc<AtomicUsize>,
    max_queued: usize,
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
            object_store: Default::default(),
        });
        let login_session = access.open_logged_in()?;
        let gate = Arc::new(Gate::default());
        let (jobs, queue) = crossbeam_channel::unbounded::<Job>();
        let waiting = Arc::new(AtomicUsize::new(0));
        let mut workers = Vec::with_capacity(config.workers);
        for index in 0..config.workers {
            let session = HsmSession::new(access.clone(), access.open_logged_in()?);
            let queue = queue.clone();
            let gate = gate.clone();
            let waiting = waiting.clone();
            let worker = std::thread::Builder::new()
                .name(format!("hsm-worker-{index}"))
                .spawn(move || serve(session, queue, &gate, &waiting))
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
                gate,
                waiting,
                max_queued: config.max_queued.max(1),
                jobs: Some(jobs),
                workers,
                login_session: Mutex::new(login_session),
            }),
        })
    }

    /// Runs `op` on a worker's session and returns its result. The closure
    /// owns what it needs (`'static`): the worker may outlive the caller's
    /// stack frame, for example if the caller's future is dropped.
    ///
    /// The job waits for a worker however many others wait: this is for
    /// work whose amount custodyd bounds itself (state changes, which
    /// serialise on the registry lock; ceremony steps; the scheduler).
    /// Requests that any caller can repeat at will use [`Hsm::try_run`].
    pub async fn run<T, F>(&self, op: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut HsmSession) -> Result<T> + Send + 'static,
    {
        self.inner.waiting.fetch_add(1, Ordering::SeqCst);
        self.submit(op).await
    }

    /// [`Hsm::run`], unless `max_queued` jobs are already waiting for a
    /// worker: then refused at once with [`ErrorKind::Busy`], and nothing
    /// is queued. So a flood of requests costs memory and latency up to a
    /// bound, and the caller hears "try again" instead of waiting behind
    /// everyone else.
    pub async fn try_run<T, F>(&self, op: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut HsmSession) -> Result<T> + Send + 'static,
    {
        let max = self.inner.max_queued;
        let admitted =
            self.inner
                .waiting
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |waiting| {
                    (waiting < max).then_some(waiting + 1)
                });
        if admitted.is_err() {
            return Err(HsmError::new(
                ErrorKind::Busy,
                format!("{max} HSM jobs are waiting for a worker"),
            ));
        }
        self.submit(op).await
    }

    /// Queues `op` (already counted in `waiting`) and awaits its answer.
    async fn submit<T, F>(&self, op: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut HsmSession) -> Result<T> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let job: Job = Box::new(move |session| {
            // The caller may have gone away; its answer is then simply dropped.
            let _ = reply.send(op(session));
        });
        let sent = self
            .inner
            .jobs
            .as_ref()
            .and_then(|jobs| jobs.send(job).ok());
        if sent.is_none() {
            self.inner.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(HsmError::new(
                ErrorKind::Unavailable,
                "HSM workers have stopped",
            ));
        }
        answer.await.map_err(|_| {
            HsmError::new(
                ErrorKind::Internal,
                "an HSM worker dropped the request (it panicked; see the log)",
            )
        })?
    }

    /// A session of its own for a caller that owns a thread (a CLI, a
    /// benchmark's baseline). Async code uses [`Hsm::run`] instead.
    ///
    /// Such a session is outside the pool and is **not** paused by
    /// [`Hsm::create_trusted_kek`]: a call made on it during that window finds
    /// the application logged out (or logged in as the SO), fails, is retried
    /// by the session's recovery a few times, and may return the error. Calls
    /// after the window work as before.
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
        self.inner.waiting.load(Ordering::SeqCst)
    }

    /// Runs `op` with the pool paused: once jobs already running have
    /// finished, and before any queued job starts. `op` gets the token access
    /// the workers use. Blocking; refused on a worker thread, whose own job
    /// would keep the pause from ever starting.
    pub(crate) fn with_workers_paused<T>(
        &self,
        op: impl FnOnce(&Arc<TokenAccess>) -> Result<T>,
    ) -> Result<T> {
        if ON_WORKER.get() {
            return Err(HsmError::new(
                ErrorKind::Internal,
                "the HSM pool cannot be paused from one of its own jobs \
                 (it would wait for itself); call this outside Hsm::run",
            ));
        }
        let _paused = self.inner.gate.pause();
        op(&self.inner.access)
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

thread_local! {
    /// Whether this thread is an HSM worker (see [`Hsm::with_workers_paused`]).
    static ON_WORKER: Cell<bool> = const { Cell::new(false) };
}

fn serve(mut session: HsmSession, queue: Receiver<Job>, gate: &Gate, waiting: &AtomicUsize) {
    ON_WORKER.set(true);
    while let Ok(job) = queue.recv() {
        waiting.fetch_sub(1, Ordering::SeqCst);
        // Held for the job only: a pause waits for it and then holds the
        // next job here, already taken from the queue but not started.
        let _running = gate.enter();
        // A panicking job must not take the worker (and its session) down: the
        // caller sees its reply channel dropped and reports an internal error.
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(&mut session)));
        if outcome.is_err() {
            tracing::error!("an HSM job panicked; the worker carries on");
        }
    }
}

/// What lets the pool be paused: workers enter it for each job; a pause waits
/// until no job is running and stops new ones from starting until it ends.
///
/// Not an `RwLock<()>` (workers reading, the pause writing): std leaves the
/// lock's fairness to the platform, and with readers preferred, workers busy
/// back to back would hold overlapping read locks and starve the pause. Here
/// a pause, once asked for, is served as soon as the jobs running then finish.
#[derive(Default)]
struct Gate {
    state: Mutex<GateState>,
    changed: Condvar,
}

#[derive(Default)]
struct GateState {
    /// A pause holds the gate or waits for running jobs to finish.
    paused: bool,
    /// Jobs running now.
    running: usize,
}

impl Gate {
    fn lock(&self) -> MutexGuard<'_, GateState> {
        // The state is two plain fields that no panic can leave half-written.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn wait<'a>(&self, state: MutexGuard<'a, GateState>) -> MutexGuard<'a, GateState> {
        self.changed
            .wait(state)
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits while the pool is paused, then counts one running job until the
    /// guard is dropped.
    fn enter(&self) -> Running<'_> {
        let mut state = self.lock();
        while state.paused {
            state = self.wait(state);
        }
        state.running += 1;
        Running(self)
    }

    /// Waits for any other pause to end, stops new jobs from starting, then
    /// waits for running jobs to finish. The pool stays paused until the guard
    /// is dropped.
    fn pause(&self) -> Paused<'_> {
        let mut state = self.lock();
        while state.paused {
            state = self.wait(state);
        }
        state.paused = true;
        while state.running > 0 {
            state = self.wait(state);
        }
        Paused(self)
    }
}

struct Running<'a>(&'a Gate);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.lock().running -= 1;
        self.0.changed.notify_all();
    }
}

struct Paused<'a>(&'a Gate);

impl Drop for Paused<'_> {
    fn drop(&mut self) {
        self.0.lock().paused = false;
        self.0.changed.notify_all();
    }
}

/// Loads and initialises `path` once per process and returns the shared context.
fn load_module(path: &Path) -> Result<Pkcs11> {
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

fn find_token(ctx: &Pkcs11, selector: &TokenSelector) -> Result<(Slot, TokenSummary)> {
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
