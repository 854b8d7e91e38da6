//! The accept loop: TCP connections in, authenticated TLS connections out to
//! tonic, within the caps of `[connections]`.
//!
//! Each accepted connection holds a slot (`max_connections`) until it closes,
//! and a handshake slot (`max_handshakes`) until its handshake ends; a
//! connection that finds no free slot is closed at once. So clients that
//! connect and never finish a handshake hold at most `max_handshakes` slots,
//! each for at most `handshake_timeout_secs`, and the loop itself never
//! waits on a client. Refused handshakes are counted in metrics and logged,
//! at most [`LOG_BURST`] lines a minute and then one line saying how many
//! were not: no RPC ran, so there is nothing to audit. A connection that a
//! reload closed ([`Connection::close`]) ends here: its reads and writes
//! fail, and tonic drops it.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc::Receiver;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_stream::Stream;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::transport::server::Connected;

use crate::tls::{Admitted, Connection, PeerInfo, TlsReloader, handshake_failure_reason};
use custody_core::config::ConnectionsSection;
use custody_core::identity::principal_from_certificate;
use custody_core::metrics;

/// Most lines about refused handshakes logged per [`LOG_WINDOW`].
pub const LOG_BURST: u32 = 20;
/// The window [`LOG_BURST`] counts in.
pub const LOG_WINDOW: Duration = Duration::from_secs(60);

/// The caps the accept loop keeps.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections open at once, handshaking or served.
    pub max_connections: usize,
    /// Handshakes in progress at once.
    pub max_handshakes: usize,
    /// How long a handshake may take.
    pub handshake_timeout: Duration,
}

impl From<&ConnectionsSection> for Limits {
    fn from(section: &ConnectionsSection) -> Self {
        Limits {
            max_connections: section.max_connections,
            max_handshakes: section.max_handshakes,
            handshake_timeout: Duration::from_secs(section.handshake_timeout_secs),
        }
    }
}

/// An accepted, authenticated TLS connection.
pub struct TlsConnection {
    stream: tokio_rustls::server::TlsStream<TcpStream>,
    peer: PeerInfo,
    closing: Pin<Box<WaitForCancellationFutureOwned>>,
    _admitted: Admitted,
    _slot: OwnedSemaphorePermit,
}

impl TlsConnection {
    /// The error every read and write returns once a reload has closed the
    /// connection. Reads also register `cx` to be woken when that happens:
    /// the connection's task always has a read pending, so a closed
    /// connection ends even while it is idle.
    fn closed(&mut self, cx: Option<&mut Context<'_>>) -> Option<io::Error> {
        let closed = self.peer.connection.is_closed()
            || cx.is_some_and(|cx| self.closing.as_mut().poll(cx).is_ready());
        closed.then(|| {
            io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "closed by custodyd: the client certificate no longer verifies",
            )
        })
    }
}

impl Connected for TlsConnection {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.peer.clone()
    }
}

impl AsyncRead for TlsConnection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some(error) = self.closed(Some(cx)) {
            return Poll::Ready(Err(error));
        }
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConnection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if let Some(error) = self.closed(None) {
            return Poll::Ready(Err(error));
        }
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Some(error) = self.closed(None) {
            return Poll::Ready(Err(error));
        }
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Accepts TCP connections within `limits` and completes TLS handshakes off
/// the accept loop; yields only connections whose client certificate
/// verified, each counted among `tls`'s open connections while it lives.
/// Once `stopping` is cancelled (the server's graceful stop began) it closes
/// the listening socket and drops every connection still in its handshake
/// or not yet taken: tonic takes no more, and a client is better told "no"
/// by the kernel than left on a connection no one will read.
pub fn incoming(
    listener: TcpListener,
    tls: Arc<TlsReloader>,
    limits: Limits,
    stopping: CancellationToken,
) -> Incoming {
    let (sender, receiver) = tokio::sync::mpsc::channel(128);
    let incoming = Incoming {
        queue: Arc::new(Mutex::new(receiver)),
    };
    // Tonic stops polling `incoming` when the stop begins but keeps it
    // until the drain ends: what is queued then is closed here. Until the
    // queue ends, not merely until it is empty: a hand-over that reserved
    // its place before the close still delivers. Held weakly, so that a
    // server dropped without a stop still ends the accept loop.
    let (queue, stopped) = (Arc::downgrade(&incoming.queue), stopping.clone());
    tokio::spawn(async move {
        stopped.cancelled().await;
        let Some(queue) = queue.upgrade() else {
            return;
        };
        let lock = || queue.lock().unwrap_or_else(PoisonError::into_inner);
        lock().close();
        while std::future::poll_fn(|cx| lock().poll_recv(cx))
            .await
            .is_some()
        {}
    });
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let handshakes = Arc::new(Semaphore::new(limits.max_handshakes));
    let log = Arc::new(RefusalLog::default());
    tokio::spawn(async move {
        loop {
            // The stop first: a connection accepted as it begins is not taken.
            let (tcp, remote) = tokio::select! {
                biased;
                () = stopping.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        tracing::warn!(%error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                () = sender.closed() => return,
            };
            // Both slots are taken here, in accept order, never waited for.
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                log.refused(remote, "connection_limit", None);
                continue;
            };
            let Ok(handshake) = handshakes.clone().try_acquire_owned() else {
                log.refused(remote, "handshake_limit", None);
                continue;
            };
            let (tls, sender, log) = (tls.clone(), sender.clone(), log.clone());
            let stopping = stopping.clone();
            tokio::spawn(async move {
                let acceptor = tls.acceptor();
                let _ = tcp.set_nodelay(true);
                let handshaking =
                    tokio::time::timeout(limits.handshake_timeout, acceptor.acceptor.accept(tcp));
                let handshake_done = tokio::select! {
                    done = handshaking => done,
                    () = stopping.cancelled() => return,
                };
                drop(handshake);
                let stream = match handshake_done {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(error)) => {
                        log.refused(remote, handshake_failure_reason(&error), Some(&error));
                        return;
                    }
                    Err(_) => {
                        log.refused(remote, "timeout", None);
                        return;
                    }
                };
                let chain: Vec<CertificateDer<'static>> = stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .map(|chain| chain.iter().map(|c| c.clone().into_owned()).collect())
                    .unwrap_or_default();
                let Some(leaf) = chain.first() else {
                    // rustls requires a client certificate; kept for safety.
                    log.refused(remote, "no_certificate", None);
                    return;
                };
                let principal = principal_from_certificate(leaf);
                let connection = Arc::new(Connection::new(chain));
                let admitted = tls.admit(connection.clone(), &acceptor);
                let closing = Box::pin(connection.closing());
                let peer = PeerInfo {
                    remote,
                    principal: Arc::new(principal),
                    connection,
                };
                let connection = TlsConnection {
                    stream,
                    peer,
                    closing,
                    _admitted: admitted,
                    _slot: slot,
                };
                tokio::select! {
                    biased;
                    () = stopping.cancelled() => {}
                    _ = sender.send(Ok(connection)) => {}
                }
            });
        }
    });
    incoming
}

/// The verified connections for tonic, in the order their handshakes ended.
pub struct Incoming {
    queue: Arc<Mutex<Receiver<Result<TlsConnection, io::Error>>>>,
}

impl Stream for Incoming {
    type Item = Result<TlsConnection, io::Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .poll_recv(cx)
    }
}

/// Counts refused handshakes and logs them, rate-limited.
#[derive(Default)]
struct RefusalLog {
    window: Mutex<LogWindow>,
}

impl RefusalLog {
    fn refused(&self, remote: SocketAddr, reason: &'static str, error: Option<&io::Error>) {
        metrics::tls_handshake_failed(reason);
        let admitted = self
            .window
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .admit(Instant::now());
        let Some(unlogged) = admitted else {
            return;
        };
        if unlogged > 0 {
            tracing::info!(
                unlogged,
                "refused TLS handshakes not logged in the previous minute (counted in custody_tls_handshake_failures_total)"
            );
        }
        match error {
            Some(error) => tracing::info!(%remote, reason, %error, "TLS handshake refused"),
            None => tracing::info!(%remote, reason, "TLS handshake refused"),
        }
    }
}

/// The current window of the refused-handshake log.
#[derive(Debug, Default)]
struct LogWindow {
    started: Option<Instant>,
    logged: u32,
    unlogged: u64,
}

impl LogWindow {
    /// Whether a refusal at `now` is logged; if it is, how many refusals
    /// the window before left unlogged (to say so once).
    fn admit(&mut self, now: Instant) -> Option<u64> {
        let mut report = 0;
        if self
            .started
            .is_none_or(|started| now.saturating_duration_since(started) >= LOG_WINDOW)
        {
            report = std::mem::take(&mut self.unlogged);
            self.started = Some(now);
            self.logged = 0;
        }
        if self.logged < LOG_BURST {
            self.logged += 1;
            Some(report)
        } else {
            self.unlogged += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_handshakes_are_logged_at_most_a_burst_a_window_and_the_rest_counted_once() {
        let start = Instant::now();
        let mut window = LogWindow::default();
        let second = Duration::from_secs(1);
        let logged: Vec<_> = (0..LOG_BURST + 500)
            .map(|i| window.admit(start + second * (i % 50)))
            .collect();
        assert!(logged[..LOG_BURST as usize].iter().all(|l| *l == Some(0)));
        assert!(logged[LOG_BURST as usize..].iter().all(Option::is_none));
        // The next window logs again, first saying how many went unlogged ...
        assert_eq!(window.admit(start + LOG_WINDOW), Some(500));
        // ... and only once.
        assert_eq!(window.admit(start + LOG_WINDOW + second), Some(0));
        // A quiet spell does not carry a count over.
        assert_eq!(window.admit(start + LOG_WINDOW * 10), Some(0));
    }
}
