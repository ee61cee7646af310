//! The HTTP side of `serve`: hyper's HTTP/1.1 server on tokio, with every limit a server on
//! a network needs, applied before kiln reads anything of the request.
//!
//! - **Connections** are bounded (`--max-connections`): one beyond the bound is accepted and
//!   closed at once; each connection is a task, never a thread. When `accept` fails (no
//!   descriptors left, say) the loop waits and tries again: the server never stops serving
//!   on its own, and it exits only on SIGINT/SIGTERM.
//! - **Reading**: a request's headers must arrive within `--read-timeout`, and so must its
//!   body; a connection idle between requests for that long is closed. Headers are bounded
//!   in size (431 beyond) and in number; a body beyond `--max-body-bytes` is refused by its
//!   declared length before any of it is read (413), and counted as it arrives otherwise, so
//!   no declared length is ever allocated.
//! - **Writing**: a client that takes nothing of the response for `--write-timeout` is cut
//!   off, which ends its stream and stops its generation.
//! - **Shutdown**: on SIGINT or SIGTERM the listener closes, idle connections close, requests
//!   in flight finish within `--shutdown-grace`, and `serve` returns.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body, Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{mpsc, Semaphore};
use tokio_io_timeout::TimeoutStream;

use super::api::ApiError;

/// Limits of the HTTP side (all from `ServeArgs`).
#[derive(Clone, Debug)]
pub(super) struct Limits {
    pub(super) max_connections: usize,
    pub(super) read_timeout: Duration,
    pub(super) write_timeout: Duration,
    pub(super) max_body: usize,
    pub(super) shutdown_grace: Duration,
}

/// Largest request head (request line and headers), in bytes.
pub(super) const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Most headers in one request.
const MAX_HEADERS: usize = 100;
/// Kernel send buffer of each connection: a client that stops reading holds at most this
/// much of the server's memory in the kernel, and its stream stalls (and is cut off by the
/// write timeout) after this much rather than after megabytes of autotuned buffer.
const SEND_BUFFER_BYTES: u32 = 64 * 1024;

/// The body of a response: whole, or a stream of server-sent events fed by a generation.
pub(super) enum ResponseBody {
    Full(Full<Bytes>),
    Events(mpsc::Receiver<Bytes>),
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            ResponseBody::Full(f) => Pin::new(f).poll_frame(cx),
            ResponseBody::Events(rx) => rx.poll_recv(cx).map(|e| e.map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ResponseBody::Full(f) => f.is_end_stream(),
            ResponseBody::Events(_) => false,
        }
    }

    /// Exact for a whole body, so that it goes with a Content-Length.
    fn size_hint(&self) -> hyper::body::SizeHint {
        match self {
            ResponseBody::Full(f) => f.size_hint(),
            ResponseBody::Events(_) => hyper::body::SizeHint::default(),
        }
    }
}

pub(super) type HttpResponse = Response<ResponseBody>;

/// Connection counts `/health` reports.
#[derive(Default)]
pub(super) struct ConnectionCounters {
    pub(super) open: AtomicUsize,
    /// Connections closed at once because `--max-connections` were open.
    pub(super) refused: AtomicU64,
    /// `accept` failures (typically: no file descriptors left).
    pub(super) accept_errors: AtomicU64,
}

/// Reads a request's body: refused by its declared length, bounded as it arrives, and
/// within `timeout`.
pub(super) async fn read_body(body: Incoming, max: usize, timeout: Duration) -> Result<Bytes, ApiError> {
    let too_big = || ApiError::new(413, "invalid_request_error", format!("the body is larger than {max} bytes"));
    if body.size_hint().lower() > max as u64 {
        return Err(too_big());
    }
    match tokio::time::timeout(timeout, Limited::new(body, max).collect()).await {
        Err(_) => Err(ApiError::new(
            408,
            "invalid_request_error",
            format!("the body did not arrive within {} s", timeout.as_secs_f64()),
        )),
        Ok(Ok(b)) => Ok(b.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(too_big()),
        Ok(Err(e)) => Err(ApiError::new(400, "invalid_request_error", format!("cannot read the body: {e}"))),
    }
}

/// Binds `addr` (with the send buffer above, inherited by every accepted connection).
pub(super) async fn bind(addr: &str) -> Result<TcpListener> {
    let mut last = None;
    for a in tokio::net::lookup_host(addr).await.with_context(|| format!("cannot resolve {addr}"))? {
        let socket = if a.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
        socket.set_reuseaddr(true)?;
        socket.set_send_buffer_size(SEND_BUFFER_BYTES)?;
        match socket.bind(a).and_then(|()| socket.listen(1024)) {
            Ok(l) => return Ok(l),
            Err(e) => last = Some(e),
        }
    }
    Err(last.map_or_else(
        || anyhow::anyhow!("{addr} names no address"),
        |e| anyhow::anyhow!("cannot listen on {addr}: {e}"),
    ))
}

/// Serves `listener` until SIGINT or SIGTERM, each request answered by `handle`.
pub(super) async fn serve_connections<H, F>(
    listener: TcpListener,
    limits: Limits,
    counters: Arc<ConnectionCounters>,
    mut signals: Signals,
    handle: H,
) -> Result<()>
where
    H: Fn(Request<Incoming>, SocketAddr) -> F + Clone + Send + Sync + 'static,
    F: std::future::Future<Output = HttpResponse> + Send + 'static,
{
    let connections = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.read_timeout)
        .max_buf_size(MAX_HEAD_BYTES)
        .max_headers(MAX_HEADERS)
        .keep_alive(true)
        .half_close(false);
    let mut last_accept_error: Option<Instant> = None;
    loop {
        let accepted = tokio::select! {
            biased;
            which = signals.next() => {
                eprintln!("serve: {which}: no new connections; finishing the requests in flight");
                break;
            }
            a = listener.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // Out of descriptors (EMFILE/ENFILE), or a connection reset before it was
                // accepted: the listener is fine, try again shortly. Said once a second at most.
                counters.accept_errors.fetch_add(1, Ordering::Relaxed);
                if last_accept_error.is_none_or(|t| t.elapsed() > Duration::from_secs(1)) {
                    eprintln!("serve: cannot accept a connection ({e}); retrying");
                    last_accept_error = Some(Instant::now());
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&connections).try_acquire_owned() else {
            counters.refused.fetch_add(1, Ordering::Relaxed);
            drop(stream); // closed at once: the client sees a reset or an end of stream
            continue;
        };
        let _ = stream.set_nodelay(true);
        let mut io = TimeoutStream::new(stream);
        io.set_write_timeout(Some(limits.write_timeout));
        let io = TokioIo::new(Box::pin(io));
        let handle = handle.clone();
        let service = hyper::service::service_fn(move |req| {
            let f = handle(req, peer);
            async move { Ok::<_, Infallible>(f.await) }
        });
        let conn = graceful.watch(builder.serve_connection(io, service));
        let counters = Arc::clone(&counters);
        counters.open.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            let _ = conn.await; // a client's error ends only its own connection
            counters.open.fetch_sub(1, Ordering::Relaxed);
            drop(permit);
        });
    }
    drop(listener);
    if tokio::time::timeout(limits.shutdown_grace, graceful.shutdown()).await.is_err() {
        eprintln!("serve: requests still running after {} s were cut off", limits.shutdown_grace.as_secs_f64());
    }
    Ok(())
}

/// SIGINT and SIGTERM, handled from the moment this exists (make it before announcing the
/// server, so that a signal sent at once is not fatal).
pub(super) struct Signals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
}

impl Signals {
    pub(super) fn new() -> Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            int: signal(SignalKind::interrupt()).context("cannot handle SIGINT")?,
            term: signal(SignalKind::terminate()).context("cannot handle SIGTERM")?,
        })
    }

    async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.int.recv() => "SIGINT",
            _ = self.term.recv() => "SIGTERM",
        }
    }
}
