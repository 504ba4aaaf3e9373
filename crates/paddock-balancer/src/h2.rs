//! HTTP/2 client connections (chosen in the TLS handshake): hyper's settings for them, and the
//! count of their streams in progress, by which an idle one is closed as an idle HTTP/1.1
//! connection is.
//!
//! Each stream is a request like any other: `proxy::handle` forwards it to a front-end over
//! HTTP/1.1. hyper runs the streams of a connection as tasks on the event loop that serves it.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use http_body::{Body, Frame, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::time::Instant;

/// Requests at once on one connection (HAProxy's default).
const MAX_STREAMS: u32 = 100;
/// A connection with no frame from the client this long is pinged; one whose ping gets no
/// answer within [`PING_TIMEOUT`] is closed.
const PING_INTERVAL: Duration = Duration::from_secs(30);
const PING_TIMEOUT: Duration = Duration::from_secs(10);

/// The settings of client connections: a request's header list is bounded by the same size
/// as an HTTP/1.1 head.
pub fn builder(max_header_bytes: usize) -> hyper::server::conn::http2::Builder<TokioExecutor> {
    let mut http = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    http.timer(TokioTimer::new())
        .max_concurrent_streams(MAX_STREAMS)
        .max_header_list_size(u32::try_from(max_header_bytes).unwrap_or(u32::MAX))
        .keep_alive_interval(PING_INTERVAL)
        .keep_alive_timeout(PING_TIMEOUT);
    http
}

/// The streams of one connection in progress, and when one last started or ended.
pub struct Streams {
    open: AtomicUsize,
    born: Instant,
    /// Milliseconds from `born`.
    last: AtomicU64,
}

impl Streams {
    pub fn new() -> Arc<Streams> {
        Arc::new(Streams {
            open: AtomicUsize::new(0),
            born: Instant::now(),
            last: AtomicU64::new(0),
        })
    }

    /// A stream starts; it ends when the returned guard goes (with the response's body, or
    /// the request's task when the client cancelled it first).
    pub fn start(self: &Arc<Streams>) -> Stream {
        self.open.fetch_add(1, Ordering::AcqRel);
        self.touch();
        Stream(self.clone())
    }

    fn touch(&self) {
        let now = u64::try_from(self.born.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.store(now, Ordering::Release);
    }

    /// Returns once no stream has been in progress for `idle`.
    pub async fn idle(&self, idle: Duration) {
        loop {
            let wait = if self.open.load(Ordering::Acquire) > 0 {
                idle
            } else {
                let last = Duration::from_millis(self.last.load(Ordering::Acquire));
                let quiet = self.born.elapsed().saturating_sub(last);
                match idle.checked_sub(quiet) {
                    Some(left) if !left.is_zero() => left,
                    _ => return,
                }
            };
            tokio::time::sleep(wait).await;
        }
    }
}

/// One stream in progress (see [`Streams::start`]).
pub struct Stream(Arc<Streams>);

impl Drop for Stream {
    fn drop(&mut self) {
        self.0.touch();
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that keeps its stream counted until it is done.
pub struct Counted<B> {
    pub body: B,
    pub stream: Stream,
}

impl<B: Body + Unpin> Body for Counted<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// What a stream's service returns.
pub type Answer<B> = Result<http::Response<Counted<B>>, Infallible>;

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_connection_is_idle_once_no_stream_was_in_progress_for_the_idle_time() {
        let streams = Streams::new();
        let idle = Duration::from_secs(10);
        // A stream in progress holds it open however long it takes.
        let stream = streams.start();
        let started = tokio::time::Instant::now();
        let waited = tokio::time::timeout(Duration::from_secs(60), streams.idle(idle)).await;
        assert!(waited.is_err(), "idle with a stream in progress");
        drop(stream);
        streams.idle(idle).await;
        assert!(
            started.elapsed() >= Duration::from_secs(70),
            "{:?}",
            started.elapsed()
        );
    }
}
