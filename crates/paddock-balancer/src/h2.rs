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

/// The streams of one connection in progress, when one last started or ended, and whether the
/// client takes their responses.
pub struct Streams {
    open: AtomicUsize,
    born: Instant,
    /// Milliseconds from `born`.
    last: AtomicU64,
    /// Streams whose body has a frame out and waits to be asked for the next one: hyper asks
    /// once the client's flow-control window has room, so while some do and none is asked for,
    /// the client is taking nothing.
    owed: AtomicUsize,
    /// When a body was last asked for a frame (milliseconds from `born`).
    taken: AtomicU64,
}

/// Why a connection should close.
#[derive(Debug, PartialEq, Eq)]
pub enum Close {
    /// No stream in progress for the idle time: closed gracefully (GOAWAY).
    Idle,
    /// Responses wait and the client has taken none of them for the send timeout.
    Stalled,
}

impl Streams {
    pub fn new() -> Arc<Streams> {
        Arc::new(Streams {
            open: AtomicUsize::new(0),
            born: Instant::now(),
            last: AtomicU64::new(0),
            owed: AtomicUsize::new(0),
            taken: AtomicU64::new(0),
        })
    }

    /// A stream starts; it ends when the returned guard goes (with the response's body, or
    /// the request's task when the client cancelled it first).
    pub fn start(self: &Arc<Streams>) -> Stream {
        self.open.fetch_add(1, Ordering::AcqRel);
        self.touch(&self.last);
        Stream {
            streams: self.clone(),
            owes: false,
        }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.born.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn touch(&self, at: &AtomicU64) {
        at.store(self.now(), Ordering::Release);
    }

    fn since(&self, at: &AtomicU64) -> Duration {
        Duration::from_millis(self.now().saturating_sub(at.load(Ordering::Acquire)))
    }

    /// Returns once the connection should close: no stream in progress for `idle`, or some
    /// response waiting on a client that took nothing for `stall`.
    pub async fn watch(&self, idle: Duration, stall: Duration) -> Close {
        loop {
            let wait = if self.open.load(Ordering::Acquire) == 0 {
                match idle.checked_sub(self.since(&self.last)) {
                    Some(left) if !left.is_zero() => left,
                    _ => return Close::Idle,
                }
            } else if self.owed.load(Ordering::Acquire) > 0 {
                match stall.checked_sub(self.since(&self.taken)) {
                    Some(left) if !left.is_zero() => left.min(idle),
                    _ => return Close::Stalled,
                }
            } else {
                idle.min(stall)
            };
            tokio::time::sleep(wait).await;
        }
    }
}

/// One stream in progress (see [`Streams::start`]).
pub struct Stream {
    streams: Arc<Streams>,
    /// Its body gave a frame and has not been asked for the next one yet.
    owes: bool,
}

impl Stream {
    /// Its body is asked for a frame.
    fn asked(&mut self) {
        self.streams.touch(&self.streams.taken);
        if std::mem::replace(&mut self.owes, false) {
            self.streams.owed.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Its body gave a frame: the next ask waits for room at the client.
    fn gave(&mut self) {
        if !std::mem::replace(&mut self.owes, true) {
            self.streams.owed.fetch_add(1, Ordering::AcqRel);
        }
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        if self.owes {
            self.streams.owed.fetch_sub(1, Ordering::AcqRel);
        }
        self.streams.touch(&self.streams.last);
        self.streams.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that keeps its stream counted until it is done, and tells it when the
/// client takes its frames.
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
        self.stream.asked();
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        if matches!(polled, Poll::Ready(Some(Ok(_)))) {
            self.stream.gave();
        }
        polled
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

    const IDLE: Duration = Duration::from_secs(10);
    const STALL: Duration = Duration::from_secs(30);

    #[tokio::test(start_paused = true)]
    async fn a_connection_is_idle_once_no_stream_was_in_progress_for_the_idle_time() {
        let streams = Streams::new();
        // A stream in progress holds it open however long it takes.
        let stream = streams.start();
        let started = Instant::now();
        let waited = tokio::time::timeout(Duration::from_secs(60), streams.watch(IDLE, STALL));
        assert!(waited.await.is_err(), "closed with a stream in progress");
        drop(stream);
        assert_eq!(streams.watch(IDLE, STALL).await, Close::Idle);
        assert!(
            started.elapsed() >= Duration::from_secs(70),
            "{:?}",
            started.elapsed()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_takes_no_response_frame_for_the_send_timeout_is_stalled() {
        let streams = Streams::new();
        let mut stream = streams.start();
        // Frames asked for and given as the client takes them: not stalled.
        for _ in 0..10 {
            stream.asked();
            stream.gave();
            let waited = tokio::time::timeout(STALL / 2, streams.watch(IDLE, STALL));
            assert!(
                waited.await.is_err(),
                "stalled while the client takes frames"
            );
        }
        // A frame given and never asked after: stalled once the send timeout has passed.
        let started = Instant::now();
        assert_eq!(streams.watch(IDLE, STALL).await, Close::Stalled);
        assert!(started.elapsed() >= STALL / 2, "{:?}", started.elapsed());
        // A body waiting on its front-end (asked, nothing given) is not the client's stall.
        stream.asked();
        let waited = tokio::time::timeout(STALL * 3, streams.watch(IDLE, STALL));
        assert!(waited.await.is_err(), "stalled while the front-end is slow");
    }
}
