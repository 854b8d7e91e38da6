//! The object-store lock: keeps the token's object store still while a
//! search reads it, among this process's sessions and, on SoftHSM2, among
//! every process on the token (custodyd replicas sharing it).
//!
//! SoftHSM2 2.6.1's file object store (Debian's) lets a search read the file
//! of an object that is still being made, and the making then fails
//! (SoftHSMv2 issue #573, fixed after 2.6.1). Within one process the failure
//! is `CKR_GENERAL_ERROR`. Across processes it is worse, measured with one
//! process listing the token in a loop while another makes EC P-256 key
//! pairs: about 1 in 150 generations fails `CKR_FUNCTION_FAILED` (and leaves
//! objects with neither label nor id), and some make a key whose public half
//! SoftHSM2 then dereferences as garbage: the making process dies of
//! SIGSEGV in `C_VerifyInit`. Signing and attribute reads on known handles,
//! run in a loop beside the same generations, failed none.
//!
//! So every call that makes or destroys an object runs alone, and searches
//! run together but not beside one; signing, wrapping and other calls on
//! known handles take no lock. [`ObjectStoreLock`] orders this process's
//! sessions with a read-write lock, and, when the module is SoftHSM2 with
//! the file backend, every process with an `flock(2)` on a file in the
//! token directory (`.custody-object-store.lock`, next to the tokens'
//! directories, which SoftHSM2 ignores): shared while this process searches,
//! exclusive while it makes or destroys. Processes that do not take it
//! (`pkcs11-tool`, an operator's tool) are not ordered; a real HSM needs
//! none of this.
//!
//! Waiting is bounded by the call deadline: a call that hangs while
//! holding the lock holds it until the call returns, and every other call
//! that needs it fails with [`ErrorKind::Timeout`] after one deadline
//! instead of waiting with it (see `watchdog.rs`).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cryptoki::context::{Function, Pkcs11};
use rustix::fs::{FlockOperation, flock};

use crate::error::{ErrorKind, HsmError, Result};

/// Where Debian's SoftHSM2 reads its config when `SOFTHSM2_CONF` is unset.
const SOFTHSM2_DEFAULT_CONF: &str = "/etc/softhsm/softhsm2.conf";

/// The lock file's name in SoftHSM2's token directory.
const LOCK_FILE: &str = ".custody-object-store.lock";

/// See the module docs.
pub(crate) struct ObjectStoreLock {
    local: parking_lot::RwLock<()>,
    processes: Option<ProcessLock>,
}

/// The `flock` on the lock file, with a count of this process's searches
/// holding it shared (one open file description carries one `flock`).
struct ProcessLock {
    file: File,
    path: PathBuf,
    searches: parking_lot::Mutex<usize>,
}

/// Held for the duration of one PKCS#11 call.
///
/// The `flock` is given back before the local lock (fields drop in order):
/// while this process holds the file, it holds the local lock in the same
/// mode, so no session of this process can take the file in the other mode
/// (on one open file description, `flock` would convert the lock, not wait).
#[expect(dead_code, reason = "held, not read: the guard is the lock")]
pub(crate) enum ObjectStoreGuard<'a> {
    Changing(Option<Exclusive<'a>>, parking_lot::RwLockWriteGuard<'a, ()>),
    Searching(Option<Shared<'a>>, parking_lot::RwLockReadGuard<'a, ()>),
    Free,
}

impl ObjectStoreLock {
    /// A lock for this process's sessions and, if `ctx` is SoftHSM2 with the
    /// file backend, for every process on its token directory.
    pub(crate) fn for_module(ctx: &Pkcs11) -> Self {
        let processes = softhsm2_token_dir(ctx).and_then(|dir| {
            let path = dir.join(LOCK_FILE);
            match std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
            {
                Ok(file) => {
                    tracing::info!(path = %path.display(), "SoftHSM2 file store: searches and changes ordered across processes");
                    Some(ProcessLock {
                        file,
                        path,
                        searches: parking_lot::Mutex::new(0),
                    })
                }
                Err(error) => {
                    tracing::warn!(path = %path.display(), %error,
                        "cannot open the SoftHSM2 object-store lock file: searches and changes \
                         are ordered within this process only");
                    None
                }
            }
        });
        Self {
            local: Default::default(),
            processes,
        }
    }

    /// The lock file ordering processes, if any.
    pub(crate) fn lock_file(&self) -> Option<&Path> {
        self.processes.as_ref().map(|p| p.path.as_path())
    }

    /// Takes what `function` needs, waiting `timeout` at most.
    pub(crate) fn hold(
        &self,
        function: Function,
        timeout: Duration,
    ) -> Result<ObjectStoreGuard<'_>> {
        let deadline = Instant::now() + timeout;
        let busy = || {
            HsmError::new(
                ErrorKind::Timeout,
                format!(
                    "C_{function:?} not called: the token's object store stayed busy for the \
                     {} ms HSM call deadline (a call that changes or searches it has not returned)",
                    timeout.as_millis()
                ),
            )
        };
        match function {
            Function::CreateObject
            | Function::CopyObject
            | Function::DestroyObject
            | Function::GenerateKey
            | Function::GenerateKeyPair
            | Function::UnwrapKey
            | Function::DeriveKey
            | Function::SetAttributeValue
            // SoftHSM2 writes the token's own file at a login; another
            // process listing tokens meanwhile reads it half-written
            // (CKR_GENERAL_ERROR, or no token at all).
            | Function::Login => {
                let local = self.local.try_write_for(timeout).ok_or_else(busy)?;
                let across = match &self.processes {
                    Some(processes) => Some(processes.exclusive(deadline).ok_or_else(busy)??),
                    None => None,
                };
                Ok(ObjectStoreGuard::Changing(across, local))
            }
            Function::FindObjectsInit | Function::FindObjects => {
                let local = self.local.try_read_for(timeout).ok_or_else(busy)?;
                let across = match &self.processes {
                    Some(processes) => Some(processes.shared(deadline).ok_or_else(busy)??),
                    None => None,
                };
                Ok(ObjectStoreGuard::Searching(across, local))
            }
            _ => Ok(ObjectStoreGuard::Free),
        }
    }
}

/// This process's exclusive `flock`, released on drop.
pub(crate) struct Exclusive<'a>(&'a ProcessLock);

/// One of this process's searches holding the shared `flock`.
pub(crate) struct Shared<'a>(&'a ProcessLock);

impl ProcessLock {
    /// `None`: the deadline passed. Called under the local write lock, so
    /// no search of this process holds the file.
    fn exclusive(&self, deadline: Instant) -> Option<Result<Exclusive<'_>>> {
        self.take(FlockOperation::NonBlockingLockExclusive, deadline)
            .map(|taken| taken.map(|()| Exclusive(self)))
    }

    /// `None`: the deadline passed. The first of this process's searches
    /// takes the shared `flock`, the last one out gives it back.
    fn shared(&self, deadline: Instant) -> Option<Result<Shared<'_>>> {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut searches = self.searches.try_lock_for(left)?;
        if *searches == 0 {
            match self.take(FlockOperation::NonBlockingLockShared, deadline)? {
                Ok(()) => {}
                Err(error) => return Some(Err(error)),
            }
        }
        *searches += 1;
        Some(Ok(Shared(self)))
    }

    /// `flock`s without blocking, again every millisecond until `deadline`.
    fn take(&self, operation: FlockOperation, deadline: Instant) -> Option<Result<()>> {
        loop {
            match flock(&self.file, operation) {
                Ok(()) => return Some(Ok(())),
                Err(rustix::io::Errno::WOULDBLOCK | rustix::io::Errno::INTR) => {}
                Err(error) => {
                    return Some(Err(HsmError::new(
                        ErrorKind::Internal,
                        format!("locking {}: {error}", self.path.display()),
                    )));
                }
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn release(&self) {
        if let Err(error) = flock(&self.file, FlockOperation::Unlock) {
            // Unlocking a lock we hold on an open file cannot fail on Linux;
            // if it did, closing the file at exit would release it.
            tracing::error!(path = %self.path.display(), %error, "unlocking the object-store lock file");
        }
    }
}

impl Drop for Exclusive<'_> {
    fn drop(&mut self) {
        self.0.release();
    }
}

impl Drop for Shared<'_> {
    fn drop(&mut self) {
        let mut searches = self.0.searches.lock();
        *searches = searches.saturating_sub(1);
        if *searches == 0 {
            self.0.release();
        }
    }
}

/// Runs `initialize` (the module's `C_Initialize`) holding the shared
/// `flock` of the file-backed SoftHSM2 token directory this process's
/// SoftHSM2 config names, if there is one, waiting `timeout` at most.
///
/// SoftHSM2 reads every token's files at `C_Initialize`, and a token whose
/// own file another process is rewriting at that moment (a login, a new
/// object) stays invalid for the life of the process: no token is listed
/// ("no initialised token", seen with replicas starting together on one
/// token). Whether the module is SoftHSM2 can only be asked after
/// `C_Initialize`, so the lock is taken whenever such a config exists; for
/// another module it orders nothing and costs one `flock`.
pub(crate) fn initializing<T>(timeout: Duration, initialize: impl FnOnce() -> T) -> Result<T> {
    let Some(path) = softhsm2_conf_token_dir().map(|dir| dir.join(LOCK_FILE)) else {
        return Ok(initialize());
    };
    let file = match std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
    {
        Ok(file) => file,
        // The same warning follows from `for_module` if the module is
        // SoftHSM2; here the initialisation just goes unordered.
        Err(_) => return Ok(initialize()),
    };
    let lock = ProcessLock {
        file,
        path,
        searches: parking_lot::Mutex::new(0),
    };
    let _still = lock.shared(Instant::now() + timeout).ok_or_else(|| {
        HsmError::new(
            ErrorKind::Timeout,
            format!(
                "C_Initialize not called: the SoftHSM2 object store stayed busy for {} ms \
                 (another process is changing it: {})",
                timeout.as_millis(),
                lock.path.display()
            ),
        )
    })??;
    Ok(initialize())
}

/// SoftHSM2's token directory, if `ctx` is SoftHSM2 with the file backend.
fn softhsm2_token_dir(ctx: &Pkcs11) -> Option<PathBuf> {
    let info = ctx.get_library_info().ok()?;
    if info.manufacturer_id().trim() != "SoftHSM" {
        return None;
    }
    softhsm2_conf_token_dir()
}

/// The file-backed token directory of the config file SoftHSM2 itself
/// reads (`SOFTHSM2_CONF`, or Debian's default), if it names one.
fn softhsm2_conf_token_dir() -> Option<PathBuf> {
    let conf = std::env::var_os("SOFTHSM2_CONF")
        .map_or_else(|| PathBuf::from(SOFTHSM2_DEFAULT_CONF), PathBuf::from);
    let text = std::fs::read_to_string(&conf).ok()?;
    let (dir, backend) = parse_softhsm2_conf(&text);
    match (dir, backend.as_deref()) {
        (Some(dir), None | Some("file")) if dir.is_dir() => Some(dir),
        _ => None,
    }
}

/// `directories.tokendir` and `objectstore.backend` of a `softhsm2.conf`.
fn parse_softhsm2_conf(text: &str) -> (Option<PathBuf>, Option<String>) {
    let mut dir = None;
    let mut backend = None;
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') {
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        match key.trim() {
            "directories.tokendir" => dir = Some(PathBuf::from(value.trim())),
            "objectstore.backend" => backend = Some(value.trim().to_string()),
            _ => {}
        }
    }
    (dir, backend)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// While any search or change of this process holds the object-store
    /// lock, another process can never take the file exclusively, however
    /// this process's searches and changes interleave.
    #[test]
    fn another_process_never_gets_the_file_while_this_one_holds_the_lock() {
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
        let dir = std::env::temp_dir().join(format!("hsm-shim-order-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(LOCK_FILE);
        let ours = ObjectStoreLock {
            local: Default::default(),
            processes: Some(process_lock(&path)),
        };
        let theirs = process_lock(&path);
        let (held, broken, done) = (
            AtomicUsize::new(0),
            AtomicUsize::new(0),
            AtomicBool::new(false),
        );
        let work = |function: Function| {
            for _ in 0..300 {
                let guard = ours.hold(function, Duration::from_secs(5)).unwrap();
                held.fetch_add(1, SeqCst);
                std::thread::sleep(Duration::from_micros(50));
                held.fetch_sub(1, SeqCst);
                drop(guard);
            }
        };
        std::thread::scope(|scope| {
            scope.spawn(|| {
                while !done.load(SeqCst) {
                    if let Some(Ok(taken)) = theirs.exclusive(Instant::now()) {
                        if held.load(SeqCst) > 0 {
                            broken.fetch_add(1, SeqCst);
                        }
                        drop(taken);
                    }
                    std::thread::yield_now();
                }
            });
            let workers = [
                scope.spawn(|| work(Function::FindObjectsInit)),
                scope.spawn(|| work(Function::FindObjectsInit)),
                scope.spawn(|| work(Function::GenerateKey)),
            ];
            for worker in workers {
                worker.join().unwrap();
            }
            done.store(true, SeqCst);
        });
        assert_eq!(
            broken.into_inner(),
            0,
            "another process took the file while this one held it"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_token_directory_and_backend_are_read_from_softhsm2_conf() {
        let conf = "# a comment = no\ndirectories.tokendir = /var/lib/softhsm/tokens/\n\
                    objectstore.backend = file\nlog.level = ERROR\n";
        assert_eq!(
            parse_softhsm2_conf(conf),
            (
                Some(PathBuf::from("/var/lib/softhsm/tokens/")),
                Some("file".into())
            )
        );
        assert_eq!(
            parse_softhsm2_conf("objectstore.backend=db"),
            (None, Some("db".into()))
        );
    }

    fn process_lock(path: &Path) -> ProcessLock {
        ProcessLock {
            file: std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(path)
                .unwrap(),
            path: path.to_path_buf(),
            searches: parking_lot::Mutex::new(0),
        }
    }

    /// Two open file descriptions stand for two processes (`flock` locks
    /// belong to the open file description).
    #[test]
    fn searches_share_the_file_and_a_change_waits_for_the_last_of_them() {
        let dir = std::env::temp_dir().join(format!("hsm-shim-lock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(LOCK_FILE);
        let (ours, theirs) = (process_lock(&path), process_lock(&path));
        let soon = || Instant::now() + Duration::from_millis(30);

        let first = ours.shared(soon()).unwrap().unwrap();
        let second = ours.shared(soon()).unwrap().unwrap();
        let beside = theirs.shared(soon()).unwrap().unwrap();
        drop(beside);
        assert!(
            theirs.exclusive(soon()).is_none(),
            "a change waits for searches"
        );
        drop(first);
        assert!(
            theirs.exclusive(soon()).is_none(),
            "... for the last of them"
        );
        drop(second);
        let change = theirs.exclusive(soon()).unwrap().unwrap();
        assert!(ours.shared(soon()).is_none(), "a search waits for a change");
        drop(change);
        let after = ours.shared(soon()).unwrap().unwrap();
        drop(after);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
