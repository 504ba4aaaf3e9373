//! Request-smuggling guard: watches the bytes a client sends and flags a connection whose request
//! framing is ambiguous (`Content-Length` together with `Transfer-Encoding`, or `Content-Length`
//! twice).
//!
//! hyper resolves both cases safely on its own (chunked wins, duplicates must agree), but it
//! drops the evidence before the request reaches the proxy, and a front-end or another proxy on
//! the path may resolve them differently. So the balancer follows the framing of the byte stream
//! itself, request after request, and answers 400 and closes the connection once it is flagged.
//! The scanner never changes a byte; anything it cannot follow (an oversized or malformed head)
//! hyper rejects by itself, so the scanner simply stops watching.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Longest chunk-size or trailer line the scanner follows (hyper's own limit for trailers).
const MAX_LINE: usize = 16 * 1024;

/// A client connection whose reads pass through a [`Scanner`], and whose writes fail once the
/// client has taken nothing for `send_timeout`.
pub struct Guarded<T> {
    inner: T,
    /// None on a connection whose framing needs no watching.
    scanner: Option<Scanner>,
    send_timeout: Duration,
    /// Armed while a write waits for the client to make room.
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Bytes the socket took, counted beneath this wrapper (where writes may be queued and
    /// sent later: [`crate::sends`]): a write waiting for room counts as stalled only while it
    /// does not move.
    sent: Arc<AtomicU64>,
    /// `sent` when the timer was armed.
    seen: u64,
}

impl<T> Guarded<T> {
    /// `suspect` is raised when the client sent an ambiguous request; `sent` counts the bytes
    /// the socket took.
    pub fn new(
        inner: T,
        max_head: usize,
        send_timeout: Duration,
        sent: Arc<AtomicU64>,
        suspect: Arc<AtomicBool>,
    ) -> Guarded<T> {
        Guarded {
            scanner: Some(Scanner::new(max_head, suspect)),
            ..Guarded::unscanned(inner, send_timeout, sent)
        }
    }

    /// A connection whose framing needs no watching (HTTP/2 frames each message itself): only
    /// its writes are timed.
    pub fn unscanned(inner: T, send_timeout: Duration, sent: Arc<AtomicU64>) -> Guarded<T> {
        Guarded {
            inner,
            scanner: None,
            send_timeout,
            stalled: None,
            sent,
            seen: 0,
        }
    }

    /// After a write: progress disarms the stall timer; waiting arms it, and fails the write
    /// once it has run out.
    fn watch<R>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<std::io::Result<R>>,
    ) -> Poll<std::io::Result<R>> {
        if polled.is_ready() {
            self.stalled = None;
            return polled;
        }
        let now = self.sent.load(Ordering::Relaxed);
        if now != self.seen {
            // The client took bytes since the timer was armed: it starts again.
            self.seen = now;
            self.stalled = None;
        }
        let timeout = self.send_timeout;
        let stalled = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        match stalled.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("the client took none of its response for {timeout:?} (--send-timeout)"),
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Guarded<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let (Poll::Ready(Ok(())), Some(scanner)) = (&polled, &mut this.scanner) {
            scanner.feed(&buf.filled()[before..]);
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Guarded<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.watch(cx, polled)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_flush(cx);
        self.watch(cx, polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        // A close may first wait for the last bytes to go out (TLS's close_notify, or writes
        // queued beneath): as long as the client takes them.
        let polled = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.watch(cx, polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.watch(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Follows HTTP/1.1 request framing over a byte stream.
pub struct Scanner {
    state: State,
    /// The head being read, or the current chunk-size / trailer line.
    line: Vec<u8>,
    max_head: usize,
    suspect: Arc<AtomicBool>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Head,
    /// Bytes of a `Content-Length` body still to come.
    Body(u64),
    ChunkSize,
    ChunkData(u64),
    /// The CRLF after a chunk's data: how many bytes of it are still to come.
    ChunkEnd(u8),
    Trailers,
    /// Not following any more: the stream is flagged, or hyper will reject it.
    Off,
}

impl Scanner {
    pub fn new(max_head: usize, suspect: Arc<AtomicBool>) -> Scanner {
        Scanner {
            state: State::Head,
            line: Vec::new(),
            max_head,
            suspect,
        }
    }

    pub fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            match self.state {
                State::Off => return,
                State::Head => {
                    if self.line.is_empty() {
                        // Empty lines before a request are allowed (RFC 9112, 2.2).
                        let skip = data
                            .iter()
                            .take_while(|b| matches!(b, b'\r' | b'\n'))
                            .count();
                        data = &data[skip..];
                        if data.is_empty() {
                            return;
                        }
                    }
                    let old_len = self.line.len();
                    self.line.extend_from_slice(data);
                    // Parse only once an empty line may have arrived (CRLF or bare LF, as
                    // hyper accepts both); the parser says where the head really ends.
                    let from = old_len.saturating_sub(2);
                    let maybe_complete = find(&self.line[from..], b"\n\n").is_some()
                        || find(&self.line[from..], b"\n\r\n").is_some();
                    match maybe_complete.then(|| self.head_done()) {
                        Some(Some((end, next))) if next != State::Off && end > old_len => {
                            data = &data[end - old_len..];
                            self.state = next;
                            self.line.clear();
                        }
                        Some(Some(_)) => {
                            self.off();
                            return;
                        }
                        _ => {
                            if self.line.len() > self.max_head {
                                self.off();
                            }
                            return;
                        }
                    }
                }
                State::Body(left) => {
                    let take = left.min(data.len() as u64);
                    data = &data[take as usize..];
                    self.state = if take == left {
                        State::Head
                    } else {
                        State::Body(left - take)
                    };
                }
                State::ChunkSize | State::Trailers => {
                    let Some(line) = self.take_line(&mut data) else {
                        return;
                    };
                    self.state = if self.state == State::Trailers {
                        if line { State::Head } else { State::Trailers }
                    } else {
                        match chunk_size(&self.line) {
                            Some(0) => State::Trailers,
                            Some(size) => State::ChunkData(size),
                            None => {
                                self.off();
                                return;
                            }
                        }
                    };
                    self.line.clear();
                }
                State::ChunkData(left) => {
                    let take = left.min(data.len() as u64);
                    data = &data[take as usize..];
                    self.state = if take == left {
                        State::ChunkEnd(2)
                    } else {
                        State::ChunkData(left - take)
                    };
                }
                State::ChunkEnd(left) => {
                    let take = usize::from(left).min(data.len());
                    data = &data[take..];
                    self.state = if take == usize::from(left) {
                        State::ChunkSize
                    } else {
                        State::ChunkEnd(left - take as u8)
                    };
                }
            }
        }
    }

    /// Reads up to and including a `\n` into `self.line`. `Some(true)` when the line is empty
    /// (the end of the trailers), `None` when it is not complete yet. A chunk-size or trailer
    /// line must end in CRLF: hyper reads a bare LF there otherwise than a line's end (as part
    /// of the trailers), so the scanner stops following such a stream.
    fn take_line(&mut self, data: &mut &[u8]) -> Option<bool> {
        match data.iter().position(|&b| b == b'\n') {
            Some(at) => {
                self.line.extend_from_slice(&data[..=at]);
                *data = &data[at + 1..];
                if !self.line.ends_with(b"\r\n") {
                    self.off();
                    return None;
                }
                Some(self.line == b"\r\n")
            }
            None => {
                self.line.extend_from_slice(data);
                *data = &[];
                if self.line.len() > MAX_LINE {
                    self.off();
                }
                None
            }
        }
    }

    /// Stops following the stream, and flags it: what the scanner cannot follow is either
    /// refused by hyper anyway or framed in a way nobody should rely on.
    fn off(&mut self) {
        self.state = State::Off;
        self.suspect.store(true, Ordering::Release);
    }

    /// Parses the head at the start of `self.line`. `None` while it is incomplete; else where
    /// it ends and what follows it (`Off` for a malformed or ambiguous head).
    fn head_done(&mut self) -> Option<(usize, State)> {
        // Few on the stack (most requests), many only when needed.
        let mut few = [httparse::EMPTY_HEADER; 32];
        let mut many;
        let mut request = httparse::Request::new(&mut few);
        let parsed = match request.parse(&self.line) {
            Err(httparse::Error::TooManyHeaders) => {
                // Rare (hyper refuses more than --max-headers anyway): a larger array.
                many = vec![httparse::EMPTY_HEADER; 4096];
                request = httparse::Request::new(&mut many);
                request.parse(&self.line)
            }
            parsed => parsed,
        };
        let end = match parsed {
            Ok(httparse::Status::Complete(end)) => end,
            Ok(httparse::Status::Partial) => return None,
            Err(_) => return Some((0, State::Off)),
        };
        let mut lengths = 0;
        let mut length = 0u64;
        let mut chunked = false;
        for h in request.headers.iter() {
            if h.name.eq_ignore_ascii_case("content-length") {
                lengths += 1;
                length = match std::str::from_utf8(h.value)
                    .ok()
                    .and_then(|v| v.trim().parse().ok())
                {
                    Some(n) => n,
                    None => return Some((0, State::Off)),
                };
            } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                chunked = true;
            }
        }
        if lengths > 1 || (lengths == 1 && chunked) {
            return Some((0, State::Off));
        }
        Some((
            end,
            if chunked {
                State::ChunkSize
            } else if length > 0 {
                State::Body(length)
            } else {
                State::Head
            },
        ))
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn chunk_size(line: &[u8]) -> Option<u64> {
    let hex = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if hex == 0 {
        return None;
    }
    // Leading zeros are allowed (and used to overflow parsers in smuggling attempts).
    let significant = line[..hex].iter().skip_while(|&&b| b == b'0').count();
    if significant == 0 {
        return Some(0);
    }
    if significant > 15 {
        return None;
    }
    u64::from_str_radix(std::str::from_utf8(&line[hex - significant..hex]).ok()?, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client that never makes room.
    struct Full;

    impl AsyncWrite for Full {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            Poll::Pending
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Pending
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Pending
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_fails_once_the_client_took_nothing_for_the_send_timeout() {
        let timeout = Duration::from_secs(10);
        let sent = Arc::new(AtomicU64::new(0));
        let mut guarded = Guarded::unscanned(Full, timeout, sent.clone());
        let mut flush =
            || futures_poll(|cx| Pin::new(&mut guarded).poll_flush(cx).map(|r| r.is_err()));
        assert_eq!(flush(), None);
        tokio::time::advance(Duration::from_secs(9)).await;
        assert_eq!(flush(), None);
        // Bytes taken beneath (by the loop's sending task): the wait starts again.
        sent.fetch_add(100, Ordering::Relaxed);
        assert_eq!(flush(), None);
        tokio::time::advance(Duration::from_secs(9)).await;
        assert_eq!(
            flush(),
            None,
            "timed out although the client took bytes 9 s ago"
        );
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(
            flush(),
            Some(true),
            "no timeout after 11 s with nothing taken"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_close_waiting_on_a_client_that_takes_nothing_fails_after_the_send_timeout() {
        let timeout = Duration::from_secs(10);
        let mut guarded = Guarded::unscanned(Full, timeout, Arc::default());
        let mut shutdown =
            || futures_poll(|cx| Pin::new(&mut guarded).poll_shutdown(cx).map(|r| r.is_err()));
        assert_eq!(shutdown(), None);
        tokio::time::advance(Duration::from_secs(11)).await;
        assert_eq!(shutdown(), Some(true));
    }

    /// Polls once with a waker that does nothing.
    fn futures_poll<R>(mut poll: impl FnMut(&mut Context<'_>) -> Poll<R>) -> Option<R> {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        match poll(&mut cx) {
            Poll::Ready(r) => Some(r),
            Poll::Pending => None,
        }
    }

    fn scan(chunks: &[&[u8]]) -> bool {
        let suspect = Arc::new(AtomicBool::new(false));
        let mut s = Scanner::new(16 * 1024, suspect.clone());
        for c in chunks {
            s.feed(c);
        }
        suspect.load(Ordering::Acquire)
    }

    fn bytewise(stream: &[u8]) -> bool {
        let pieces: Vec<&[u8]> = stream.chunks(1).collect();
        scan(&pieces)
    }

    #[test]
    fn clean_requests_pass_in_any_split() {
        let stream: &[u8] = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n\
            POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 39\r\n\r\n\
            Content-Length: 5\r\nTransfer-Encoding: x\
            POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n\
            5;ext=1\r\nhello\r\n0\r\nX-Trailer: 1\r\n\r\n\
            GET /d HTTP/1.1\r\nHost: x\r\n\r\n";
        assert!(!scan(&[stream]));
        assert!(!bytewise(stream), "the same stream one byte at a time");
    }

    #[test]
    fn ambiguous_framing_is_flagged() {
        assert!(scan(&[
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
        ]));
        assert!(scan(&[
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\ncontent-length: 3\r\n\r\nabc"
        ]));
        // A smuggled request behind a clean one, after a chunked body.
        assert!(bytewise(
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n\
              GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n"
        ));
    }

    #[test]
    fn bare_lf_heads_and_leading_zeros_are_followed() {
        // Bare-LF head then an ambiguous one: the second is found.
        assert!(bytewise(
            b"GET / HTTP/1.1\nHost: x\n\nPOST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        ));
        // A bare-LF POST whose body holds CRLFCRLF is clean.
        assert!(!bytewise(
            b"POST / HTTP/1.1\nHost: x\nContent-Length: 6\n\nab\r\n\r\nGET / HTTP/1.1\nHost: x\n\n"
        ));
        // Chunk sizes with leading zeros, then a clean request.
        assert!(!bytewise(
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n00000000000000001\r\na\r\n0\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n"
        ));
        // What the scanner cannot follow is flagged.
        assert!(scan(&[
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"
        ]));
        // A bare LF ending the trailers: hyper reads on (as trailers), so the stream is not
        // followed, and what it hides is never taken for a clean request.
        assert!(bytewise(
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\n\
              GET /b HTTP/1.1\r\nHost: x\r\n\r\n"
        ));
        // So is a bare LF after a chunk size.
        assert!(scan(&[
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n1\na\r\n0\r\n\r\n"
        ]));
    }

    #[test]
    fn bodies_are_not_read_as_heads() {
        // The body contains what would be ambiguous headers; it is data, not a request.
        assert!(!bytewise(
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 56\r\n\r\n\
              GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n"
        ));
    }
}
