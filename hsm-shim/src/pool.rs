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
//! Every PKCS#11 call a worker makes has a deadline (`HsmConfig::
//! call_timeout`); a watchdog thread abandons and replaces a worker whose
//! call passed it, and answers its caller with [`ErrorKind::Timeout`]: see
//! `watchdog.rs`.
//!
//! Why worker threads, and why two: `docs/architecture.md` and
//! `docs/benchmarks.md`.

use std::cell::Cell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Function, Pkcs11};
use cryptoki::error::{Error as CryptokiError, RvError};
use cryptoki::session::Session;
use cryptoki::slot::Slot;
use tokio::sync::oneshot;

use crate::config::{HsmConfig, TokenSelector};
use crate::error::{ErrorKind, HsmError, Result};
use crate::fault::Faults;
use crate::session::{HandleCache, HsmSession, TokenAccess};
use crate::store_lock::{self, ObjectStoreLock};
use crate::types::TokenSummary;
use crate::watchdog::{self, CallWatch, Fail, MAX_ABANDONED_PER_WORKER};

/// One queued job: `run` gets the worker's session (or why the worker has
/// none), `fail` answers the caller instead when the worker is lost or the
/// job cannot start. Whichever comes first answers; the other finds the
/// answer gone.
struct Job {
    run: Run,
    fail: Fail,
    /// How many requests it holds (counted in `waiting`).
    requests: usize,
}

type Run = Box<dyn FnOnce(Result<&mut HsmSession>) + Send>;

/// A handle to the HSM; cheap to clone, shared by all tasks of the process.
#[derive(Clone)]
pub struct Hsm {
    inner: Arc<Inner>,
}

/// What workers and the watchdog share.
struct Shared {
    access: Arc<TokenAccess>,
    gate: Gate,
    /// Requests queued and not yet taken by a worker (of both [`Hsm::run`]
    /// and [`Hsm::try_run`]; a job counts the requests it holds);
    /// `try_run` refuses at `max_queued`.
    waiting: AtomicUsize,
    queue: Receiver<Job>,
    /// Lost workers whose hung call has not returned yet.
    abandoned: AtomicUsize,
    /// At this many abandoned workers, jobs fail at once (see `watchdog.rs`).
    max_abandoned: usize,
}

struct Inner {
    shared: Arc<Shared>,
    token: TokenSummary,
    max_queued: usize,
    jobs: Option<Sender<Job>>,
    crew: Arc<Crew>,
    /// Stopped and joined first when the pool is dropped.
    watchdog: Option<Watchdog>,
    // Holds the application's login; see the module docs.
    #[cfg_attr(
        not(feature = "fault-injection"),
        expect(dead_code, reason = "held, not read: it keeps the login alive")
    )]
    login_session: Mutex<Session>,
}

/// The workers and their losses: what the watchdog changes. The watchdog
/// holds this and never the pool, so the pool's last handle is never
/// dropped on the watchdog's thread, which no one waits for: dropping the
/// pool joins every thread of it, and none is left inside the module while
/// the process exits (SoftHSM2 tearing itself down under a call in flight
/// can crash or hang the exit).
struct Crew {
    shared: Arc<Shared>,
    workers: Mutex<Vec<Worker>>,
    /// Workers lost to a call past its deadline, since the start.
    lost: AtomicU64,
}

/// The watchdog's thread; dropping `stop` ends it.
struct Watchdog {
    stop: Sender<()>,
    thread: JoinHandle<()>,
}

/// One worker thread and its deadline watch.
struct Worker {
    watch: Arc<CallWatch>,
    thread: JoinHandle<()>,
}

impl std::fmt::Debug for Hsm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hsm")
            .field("token", &self.inner.token)
            .field("workers", &self.workers())
            .finish()
    }
}

impl Hsm {
    /// Loads the module (once per process), finds the token, logs in, and
    /// starts `config.workers` worker threads with a session each, and the
    /// watchdog that holds their calls to `config.call_timeout`.
    pub fn open(config: HsmConfig) -> Result<Hsm> {
        if config.workers == 0 {
            return Err(HsmError::new(
                ErrorKind::Configuration,
                "at least one HSM worker is needed",
            ));
        }
        watchdog::check_call_timeout(config.call_timeout)?;
        let ctx = load_module(&config.module, config.call_timeout)?;
        let object_store = ObjectStoreLock::for_module(&ctx);
        // Read like a search: another process making an object on a
        // file-backed token rewrites the files a token listing reads, and
        // SoftHSM2 then lists no token at all.
        let (slot, token) = {
            let _still = object_store.hold(Function::FindObjectsInit, config.call_timeout)?;
            find_token(&ctx, &config.token)?
        };
        let access = Arc::new(TokenAccess {
            ctx,
            slot,
            pin: config.pin,
            cache: HandleCache::default(),
            faults: Faults::default(),
            object_store,
            call_timeout: config.call_timeout,
        });
        let login_session = access.open_logged_in()?;
        let (jobs, queue) = crossbeam_channel::unbounded::<Job>();
        let shared = Arc::new(Shared {
            access: access.clone(),
            gate: Gate::default(),
            waiting: AtomicUsize::new(0),
            queue,
            abandoned: AtomicUsize::new(0),
            max_abandoned: config.workers.saturating_mul(MAX_ABANDONED_PER_WORKER),
        });
        let mut workers = Vec::with_capacity(config.workers);
        for _ in 0..config.workers {
            let watch = Arc::new(CallWatch::default());
            let session =
                HsmSession::watched(access.clone(), access.open_logged_in()?, watch.clone());
            workers.push(start_worker(&shared, watch, Some(session))?);
        }
        let crew = Arc::new(Crew {
            shared: shared.clone(),
            workers: Mutex::new(workers),
            lost: AtomicU64::new(0),
        });
        // Made before the watchdog starts, so that a failure to start it
        // stops the workers (the pool's drop).
        let mut inner = Inner {
            shared,
            token,
            max_queued: config.max_queued.max(1),
            jobs: Some(jobs),
            crew: crew.clone(),
            watchdog: None,
            login_session: Mutex::new(login_session),
        };
        let (stop, stopped) = crossbeam_channel::bounded::<()>(0);
        let thread = std::thread::Builder::new()
            .name("hsm-watchdog".into())
            .spawn(move || watch_calls(&crew, &stopped, config.call_timeout))
            .map_err(|e| {
                HsmError::new(
                    ErrorKind::Internal,
                    format!("starting the HSM watchdog: {e}"),
                )
            })?;
        inner.watchdog = Some(Watchdog { stop, thread });
        let hsm = Hsm {
            inner: Arc::new(inner),
        };
        tracing::info!(
            token = %hsm.inner.token.label,
            serial = %hsm.inner.token.serial,
            model = %hsm.inner.token.model,
            workers = config.workers,
            call_timeout_ms = config.call_timeout.as_millis(),
            "HSM open"
        );
        Ok(hsm)
    }

    /// Runs `op` on a worker's session and returns its result. The closure
    /// owns what it needs (`'static`): the worker may outlive the caller's
    /// stack frame, for example if the caller's future is dropped.
    ///
    /// The job waits for a worker however many others wait: this is for
    /// work whose amount custodyd bounds itself (state changes, which
    /// serialise on the registry lock; ceremony steps; the scheduler).
    /// Requests that any caller can repeat at will use [`Hsm::try_run`].
    ///
    /// Once a worker takes it, the job is bounded: each of its PKCS#11 calls
    /// by the call deadline (past it: [`ErrorKind::Timeout`], see
    /// `watchdog.rs`), and so is its wait at a paused gate.
    pub async fn run<T, F>(&self, op: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut HsmSession) -> Result<T> + Send + 'static,
    {
        self.inner.shared.waiting.fetch_add(1, Ordering::SeqCst);
        self.submit(op, 1)?.await.map_err(|_| dropped())?
    }

    /// [`Hsm::run`] for a thread outside the async runtime (the audit
    /// writer): blocks until the answer comes. Must not be called on a
    /// runtime thread or an HSM worker.
    pub fn run_blocking<T, F>(&self, op: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut HsmSession) -> Result<T> + Send + 'static,
    {
        if ON_WORKER.get() {
            return Err(HsmError::new(
                ErrorKind::Internal,
                "an HSM job cannot wait for another HSM job",
            ));
        }
        self.inner.shared.waiting.fetch_add(1, Ordering::SeqCst);
        self.submit(op, 1)?.blocking_recv().map_err(|_| dropped())?
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
        self.try_run_batch(1, op).await
    }

    /// [`Hsm::try_run`] for a job that does the work of `requests`
    /// requests (a stream's batch of signatures): it counts as that many
    /// against `max_queued`, so batching buys no deeper queue. A batch
    /// larger than the bound still runs when nothing else waits.
    pub async fn try_run_batch<T, F>(&self, requests: usize, op: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut HsmSession) -> Result<T> + Send + 'static,
    {
        let max = self.inner.max_queued;
        let requests = requests.max(1);
        let admitted =
            self.inner
                .shared
                .waiting
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |waiting| {
                    (waiting == 0 || waiting + requests <= max).then_some(waiting + requests)
                });
        if admitted.is_err() {
            return Err(HsmError::new(
                ErrorKind::Busy,
                format!("{max} HSM requests are waiting for a worker"),
            ));
        }
        self.submit(op, requests)?.await.map_err(|_| dropped())?
    }

    /// Queues `op`, holding `requests` requests (already counted in
    /// `waiting`); the receiver gets its answer.
    fn submit<T, F>(&self, op: F, requests: usize) -> Result<oneshot::Receiver<Result<T>>>
    where
        T: Send + 'static,
        F: FnOnce(&mut HsmSession) -> Result<T> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let reply = Arc::new(Mutex::new(Some(reply)));
        let failing = reply.clone();
        // The caller may have gone away; its answer is then simply dropped.
        let job = Job {
            run: Box::new(move |session| {
                let outcome = session.and_then(op);
                if let Some(reply) = take(&reply) {
                    let _ = reply.send(outcome);
                }
            }),
            fail: Box::new(move |error| {
                if let Some(reply) = take(&failing) {
                    let _ = reply.send(Err(error));
                }
            }),
            requests,
        };
        let sent = self
            .inner
            .jobs
            .as_ref()
            .and_then(|jobs| jobs.send(job).ok());
        if sent.is_none() {
            self.inner
                .shared
                .waiting
                .fetch_sub(requests, Ordering::SeqCst);
            return Err(HsmError::new(
                ErrorKind::Unavailable,
                "HSM workers have stopped",
            ));
        }
        Ok(answer)
    }

    /// A session of its own for a caller that owns a thread (a CLI, a
    /// benchmark's baseline). Async code uses [`Hsm::run`] instead.
    ///
    /// Such a session is outside the pool: its calls have **no deadline**
    /// (its caller owns the thread), and it is **not** paused by
    /// [`Hsm::create_trusted_kek`]: a call made on it during that window
    /// finds the application logged out (or logged in as the SO), fails, is
    /// retried by the session's recovery a few times, and may return the
    /// error. Calls after the window work as before.
    pub fn session(&self) -> Result<HsmSession> {
        let access = &self.inner.shared.access;
        let session = access.open_logged_in()?;
        Ok(HsmSession::new(access.clone(), session))
    }

    /// What the token says about itself.
    pub fn token(&self) -> &TokenSummary {
        &self.inner.token
    }

    /// The file whose `flock` orders searches and changes of the token's
    /// objects across processes, if the module needs one (SoftHSM2's file
    /// store; see `store_lock.rs`).
    pub fn object_store_lock_file(&self) -> Option<&Path> {
        self.inner.shared.access.object_store.lock_file()
    }

    /// Number of worker threads serving the pool (lost ones not counted;
    /// their replacements are).
    pub fn workers(&self) -> usize {
        lock(&self.inner.crew.workers).len()
    }

    /// Workers lost to a call past its deadline since the pool started (a
    /// counter for metrics).
    pub fn lost_workers(&self) -> u64 {
        self.inner.crew.lost.load(Ordering::SeqCst)
    }

    /// Lost workers whose hung call has not returned yet (a gauge for
    /// metrics and health: above zero, the HSM is not answering).
    pub fn stuck_calls(&self) -> usize {
        self.inner.shared.abandoned.load(Ordering::SeqCst)
    }

    /// Whether the pool is paused (or about to be) for a token security
    /// officer step: jobs wait until it ends (for health: not ready).
    pub fn paused(&self) -> bool {
        self.inner.shared.gate.lock().paused
    }

    /// Requests waiting for a worker (a gauge for metrics).
    pub fn queued(&self) -> usize {
        self.inner.shared.waiting.load(Ordering::SeqCst)
    }

    /// Runs `op` with the pool paused: once jobs already running have
    /// finished (or their workers were lost), and before any queued job
    /// starts. `op` gets the token access the workers use. Blocking;
    /// refused on a worker thread, whose own job would keep the pause from
    /// ever starting.
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
        let _paused = self.inner.shared.gate.pause();
        op(&self.inner.shared.access)
    }

    /// The fault plan of this HSM, for tests of failure handling.
    #[cfg(feature = "fault-injection")]
    pub fn faults(&self) -> &crate::fault::FaultInjector {
        &self.inner.shared.access.faults.injector
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

impl Crew {
    /// The watchdog's round: every worker whose call passed the deadline is
    /// lost; its caller is answered, its place in the gate given up, and a
    /// fresh worker started in its place.
    fn replace_overdue(&self, deadline: Duration) {
        let now = Instant::now();
        let mut workers = lock(&self.workers);
        for worker in workers.iter_mut() {
            let Some((function, fail)) = worker.watch.overdue(now, deadline) else {
                continue;
            };
            // The lost worker no longer counts as running (see `serve`).
            self.shared.gate.leave();
            self.shared.abandoned.fetch_add(1, Ordering::SeqCst);
            self.lost.fetch_add(1, Ordering::SeqCst);
            tracing::error!(
                function = %format!("C_{function:?}"),
                deadline_ms = deadline.as_millis(),
                "an HSM call passed its deadline: its worker is abandoned and replaced"
            );
            if let Some(fail) = fail {
                fail(watchdog::timed_out(function, deadline));
            }
            match start_worker(&self.shared, Arc::new(CallWatch::default()), None) {
                // The lost thread is detached: it exits when its call returns.
                Ok(fresh) => drop(std::mem::replace(worker, fresh).thread),
                Err(error) => tracing::error!(%error, "starting a replacement HSM worker"),
            }
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        let me = std::thread::current().id();
        // The watchdog first, so that it replaces no worker while they stop.
        // (It holds no handle, but a caller it answers might drop the last.)
        if let Some(watchdog) = self.watchdog.take() {
            drop(watchdog.stop);
            if watchdog.thread.thread().id() != me && watchdog.thread.join().is_err() {
                tracing::error!("the HSM watchdog panicked");
            }
        }
        // Closing the queue ends each worker's loop once it drains.
        self.jobs.take();
        let workers = std::mem::take(&mut *lock(&self.crew.workers));
        for worker in workers {
            // The last handle may be dropped by a job on a worker itself.
            if worker.thread.thread().id() != me && worker.thread.join().is_err() {
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

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn take<T>(slot: &Mutex<Option<T>>) -> Option<T> {
    lock(slot).take()
}

fn dropped() -> HsmError {
    HsmError::new(
        ErrorKind::Internal,
        "an HSM worker dropped the request (it panicked; see the log)",
    )
}

fn start_worker(
    shared: &Arc<Shared>,
    watch: Arc<CallWatch>,
    session: Option<HsmSession>,
) -> Result<Worker> {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let index = NEXT.fetch_add(1, Ordering::Relaxed);
    let (for_thread, serving) = (shared.clone(), watch.clone());
    let thread = std::thread::Builder::new()
        .name(format!("hsm-worker-{index}"))
        .spawn(move || serve(session, &serving, &for_thread))
        .map_err(|e| HsmError::new(ErrorKind::Internal, format!("starting HSM worker: {e}")))?;
    Ok(Worker { watch, thread })
}

/// The watchdog: a few times per deadline, replaces workers whose call
/// passed it. Ends when the pool drops `stop`'s sender.
fn watch_calls(crew: &Crew, stop: &Receiver<()>, deadline: Duration) {
    let tick = watchdog::tick(deadline);
    while let Err(crossbeam_channel::RecvTimeoutError::Timeout) = stop.recv_timeout(tick) {
        crew.replace_overdue(deadline);
    }
}

/// A worker's loop. `session` is `None` for a replacement, which opens its
/// session on its first job, under the deadline.
fn serve(mut session: Option<HsmSession>, watch: &Arc<CallWatch>, shared: &Shared) {
    ON_WORKER.set(true);
    while let Ok(job) = shared.queue.recv() {
        shared.waiting.fetch_sub(job.requests, Ordering::SeqCst);
        let deadline = shared.access.call_timeout;
        let stuck = shared.abandoned.load(Ordering::SeqCst);
        if stuck >= shared.max_abandoned {
            refuse(
                job,
                HsmError::new(
                    ErrorKind::Timeout,
                    format!(
                        "{stuck} HSM calls passed their deadline and have not returned; no more calls until they do"
                    ),
                ),
            );
            continue;
        }
        // A pause waits for running jobs and then holds the next one here,
        // already taken from the queue but not started; for a deadline at
        // most.
        if !shared.gate.enter(deadline) {
            refuse(
                job,
                HsmError::new(
                    ErrorKind::Timeout,
                    format!(
                        "the HSM pool stayed paused for the {} ms call deadline (a token security officer step is running)",
                        deadline.as_millis()
                    ),
                ),
            );
            continue;
        }
        watch.begin_job(job.fail);
        let run = job.run;
        // A panicking job must not take the worker (and its session) down: the
        // caller sees its reply channel dropped and reports an internal error.
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            run(open_if_needed(&mut session, watch, shared))
        }));
        if outcome.is_err() {
            tracing::error!("an HSM job panicked; the worker carries on");
        }
        if watch.end_job() {
            // Lost: the watchdog answered the caller, left the gate for us
            // and started a replacement.
            shared.abandoned.fetch_sub(1, Ordering::SeqCst);
            tracing::warn!(
                "an abandoned HSM worker's call returned; it closes its session and exits"
            );
            return;
        }
        shared.gate.leave();
    }
}

/// Answers a job that will not run with `error`, once the job itself (and
/// whatever it holds, such as its caller's share of the HSM) is dropped,
/// so that a caller retrying at once finds it released.
fn refuse(job: Job, error: HsmError) {
    let Job { run, fail, .. } = job;
    drop(run);
    fail(error);
}

/// The worker's session, opened (and logged in) under the deadline if it has
/// none yet.
fn open_if_needed<'a>(
    session: &'a mut Option<HsmSession>,
    watch: &Arc<CallWatch>,
    shared: &Shared,
) -> Result<&'a mut HsmSession> {
    if session.is_none() {
        let access = &shared.access;
        let opened = watch.call(Function::OpenSession, || access.open_logged_in())?;
        *session = Some(HsmSession::watched(access.clone(), opened, watch.clone()));
    }
    session
        .as_mut()
        .ok_or_else(|| HsmError::new(ErrorKind::Internal, "worker without a session"))
}

/// What lets the pool be paused: workers enter it for each job; a pause waits
/// until no job is running and stops new ones from starting until it ends.
///
/// Not an `RwLock<()>` (workers reading, the pause writing): std leaves the
/// lock's fairness to the platform, and with readers preferred, workers busy
/// back to back would hold overlapping read locks and starve the pause. Here
/// a pause, once asked for, is served as soon as the jobs running then finish.
///
/// Entering and leaving are explicit calls, not a guard: a lost worker's job
/// is still "running" on its thread, and the watchdog leaves the gate for it
/// (exactly once: see [`CallWatch::overdue`] and [`CallWatch::end_job`]).
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
        lock(&self.state)
    }

    fn wait<'a>(&self, state: MutexGuard<'a, GateState>) -> MutexGuard<'a, GateState> {
        self.changed
            .wait(state)
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits while the pool is paused, for `timeout` at most, then counts one
    /// running job until [`Gate::leave`]. False if the pause lasted longer.
    fn enter(&self, timeout: Duration) -> bool {
        let until = Instant::now() + timeout;
        let mut state = self.lock();
        while state.paused {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            state = self
                .changed
                .wait_timeout(state, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        state.running += 1;
        true
    }

    /// One running job ended (or was abandoned).
    fn leave(&self) {
        let mut state = self.lock();
        state.running = state.running.saturating_sub(1);
        drop(state);
        self.changed.notify_all();
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

struct Paused<'a>(&'a Gate);

impl Drop for Paused<'_> {
    fn drop(&mut self) {
        self.0.lock().paused = false;
        self.0.changed.notify_all();
    }
}

/// Loads and initialises `path` once per process and returns the shared
/// context; the initialisation waits `timeout` at most for other processes
/// changing a SoftHSM2 token (see `store_lock::initializing`).
fn load_module(path: &Path, timeout: Duration) -> Result<Pkcs11> {
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
    let initialized = store_lock::initializing(timeout, || {
        ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
    })?;
    match initialized {
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
