//! The etcd backend's own tokio runtime, and the bridge from the store's
//! synchronous API to it: every call runs there while the caller waits on
//! a plain channel.

use std::future::Future;

use tokio::runtime::{Handle, Runtime, RuntimeFlavor};

use crate::{Result, StoreError};

/// The backend's own runtime. Dropped without waiting for its tasks, so
/// that the last store or claim may go away anywhere, inside an async
/// context too.
pub(crate) struct Bridge {
    runtime: Option<Runtime>,
}

impl Drop for Bridge {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl Bridge {
    pub(super) fn new() -> Result<Bridge> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("custody-etcd")
            .enable_all()
            .build()
            .map_err(|e| StoreError::Failed(format!("etcd client runtime: {e}")))?;
        Ok(Bridge {
            runtime: Some(runtime),
        })
    }

    pub(super) fn handle(&self) -> Option<&Handle> {
        self.runtime.as_ref().map(Runtime::handle)
    }

    /// Runs `work` on the backend's runtime and blocks the calling thread
    /// until it is done. `work` must end by itself (every RPC in it has a
    /// deadline).
    pub(crate) fn wait<T: Send + 'static>(
        &self,
        work: impl Future<Output = Result<T>> + Send + 'static,
    ) -> Result<T> {
        let handle = self.handle().ok_or_else(stopped)?;
        let (done, answer) = std::sync::mpsc::sync_channel(1);
        handle.spawn(async move {
            let _ = done.send(work.await);
        });
        blocking(|| answer.recv()).unwrap_or_else(|_| Err(stopped()))
    }

    /// Runs `work` on the backend's runtime, for an async caller on any
    /// runtime.
    pub(crate) async fn run<T: Send + 'static>(
        &self,
        work: impl Future<Output = Result<T>> + Send + 'static,
    ) -> Result<T> {
        let handle = self.handle().ok_or_else(stopped)?;
        handle.spawn(work).await.unwrap_or_else(|_| Err(stopped()))
    }
}

pub(super) fn stopped() -> StoreError {
    StoreError::Failed("the etcd client runtime stopped".into())
}

/// Runs `f`, which blocks, on a thread that may: inside `block_in_place`
/// on a tokio multi-thread worker; as it is anywhere else (a plain thread,
/// or a current-thread runtime, where `block_in_place` would panic and
/// there is nothing to hand the runtime to).
pub(crate) fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}
