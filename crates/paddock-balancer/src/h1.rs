//! HTTP/1.1 towards the front-ends: one exchange at a time on a keep-alive connection, driven
//! by the task of the client's request.
//!
//! The client side of the balancer is hyper's server; this side is not hyper's client on
//! purpose. hyper's client runs every connection as a task of its own and hands requests,
//! responses and body chunks over channels between that task and the request's; for a proxy
//! whose work per request is small, that hand-over was a third of the user-space time
//! (`bench/RESULTS.md`). Here the request's task writes the head (already encoded by
//! [`crate::proxy`]) and reads the response on the connection itself; the response body is read
//! from the socket while hyper's server polls it, and the bytes go to the client without a copy.
//! The head of a request without a body is queued with the loop turn's other sends
//! ([`crate::sends`]), so that a front-end gets a turn's requests together; a request with a body
//! writes its head and body at once, so that a head that could not be sent is known before the
//! body is read from the client, which can then be sent again elsewhere.
//!
//! What a response may be is RFC 9112's: interim `1xx` answers are skipped (`101` is refused:
//! the balancer forwards no upgrade), a response to `HEAD` and a `204` or `304` have no body,
//! `Transfer-Encoding: chunked` is decoded (trailers forwarded), otherwise `Content-Length`
//! (several values only when equal), otherwise the body ends with the connection. A connection
//! goes back to the pool only after an exchange that ended exactly where its framing said, with
//! nothing unread, and when the front-end did not ask to close it.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt as _;
use tokio::io::{AsyncRead, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use crate::sends::{Sends, Stream};

/// Room read into at once.
const READ_ROOM: usize = 16 * 1024;
/// Largest response head (status line and headers).
pub const MAX_HEAD: usize = 64 * 1024;
/// Most headers in a response.
const MAX_HEADERS: usize = 128;
/// Headers a response usually stays within.
const FEW_HEADERS: usize = 24;

/// What went wrong in an exchange, as the retry rules need it.
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    /// Nothing of the request reached the connection.
    #[error("the request could not be sent: {0}")]
    Unsent(io::Error),
    /// The request (or part of it) was written; no byte of a response came back.
    #[error("{0} before any response byte")]
    NoResponse(String),
    /// The front-end answered something that is not an HTTP/1.1 response the balancer forwards.
    #[error("invalid response: {0}")]
    Invalid(String),
    /// The client's request body could not be read.
    #[error("the request body could not be read from the client: {0}")]
    ClientBody(hyper::Error),
}

/// A connection to a front-end.
pub struct Connection {
    /// The heads of requests without a body go out with the loop turn's other sends
    /// ([`crate::sends`]); a request with a body (head and body), and everything on a health
    /// check's connection, at once.
    stream: Stream,
    /// Where the request being exchanged starts in the count of bytes sent (see
    /// [`Stream::withdraw`]).
    request_at: u64,
    /// `buf[..filled]` is read and not consumed; the rest is room (initialized, so that reads
    /// need no `unsafe`).
    buf: BytesMut,
    filled: usize,
    /// The forwarded headers of the response being parsed: name and value's place in the head
    /// (kept between exchanges, so that parsing allocates nothing for it).
    fields: Vec<(HeaderName, usize, usize)>,
    /// Whether an exchange completed on it before (a reused connection may have been closed by
    /// the front-end in the meantime).
    pub reused: bool,
}

impl Connection {
    /// Connects, with writes queued on `sends` (the current event loop's) when given.
    pub async fn connect(
        address: &str,
        timeout: Duration,
        sends: Option<&Arc<Sends>>,
    ) -> io::Result<Connection> {
        let stream = tokio::time::timeout(timeout, TcpStream::connect(address))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
        stream.set_nodelay(true)?;
        let stream = match sends {
            Some(sends) => sends.front_end(stream),
            None => Stream::direct(stream),
        };
        Ok(Connection {
            stream,
            request_at: 0,
            buf: BytesMut::new(),
            filled: 0,
            fields: Vec::new(),
            reused: false,
        })
    }

    /// Whether it still looks usable: the front-end did not close it and sent nothing unasked,
    /// no write failed, and no byte of the last request is still waiting to go out. Costs a
    /// system call only when the socket was signalled readable.
    pub fn is_open(&self) -> bool {
        self.stream.is_open()
    }

    /// Writes a request head (and a body short enough to be part of it), queued with the loop
    /// turn's other sends. [`ExchangeError::Unsent`] means nothing was written, here or from
    /// [`Connection::read_response`] when the connection ended before the queued head reached
    /// it; an error after part of a head larger than a queued write went out is `NoResponse`.
    pub async fn write_head(&mut self, head: &[u8]) -> Result<(), ExchangeError> {
        self.request_at = self.stream.end();
        let written = self.stream.write(head).await;
        self.rest_of_head(head, written).await
    }

    /// Writes a request head at once: [`ExchangeError::Unsent`] means nothing was written, and
    /// is known before the request's body is read from the client.
    pub async fn write_head_now(&mut self, head: &[u8]) -> Result<(), ExchangeError> {
        self.request_at = self.stream.end();
        let written = self.stream.write_now(head).await;
        self.rest_of_head(head, written).await
    }

    async fn rest_of_head(
        &mut self,
        head: &[u8],
        written: io::Result<usize>,
    ) -> Result<(), ExchangeError> {
        match written.map_err(ExchangeError::Unsent)? {
            0 => Err(ExchangeError::Unsent(io::ErrorKind::WriteZero.into())),
            n => {
                self.stream.write_all_now(&head[n..]).await.map_err(|e| {
                    ExchangeError::NoResponse(format!("sending the request failed: {e}"))
                })
            }
        }
    }

    /// Streams the client's body: as it comes when it has a `Content-Length`, re-chunked when it
    /// was chunked. `Err(Ok(e))` is the front-end's side failing, `Err(Err(e))` the client's.
    pub async fn write_body(
        &mut self,
        mut body: hyper::body::Incoming,
        chunked: bool,
    ) -> Result<(), Result<io::Error, hyper::Error>> {
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(Err)?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            if data.is_empty() {
                continue;
            }
            if chunked {
                let mut chunk = Vec::with_capacity(data.len() + 20);
                chunk.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
                chunk.extend_from_slice(&data);
                chunk.extend_from_slice(b"\r\n");
                self.stream.write_all_now(&chunk).await.map_err(Ok)?;
            } else {
                self.stream.write_all_now(&data).await.map_err(Ok)?;
            }
        }
        if chunked {
            self.stream.write_all_now(b"0\r\n\r\n").await.map_err(Ok)?;
        }
        Ok(())
    }

    /// Reads the response head (after any interim `1xx`). `head_request`: the request was a
    /// `HEAD`, so the response has no body whatever its headers say.
    pub async fn read_response(
        mut self,
        head_request: bool,
    ) -> Result<(http::response::Parts, ResponseBody), ExchangeError> {
        let mut got_any = false;
        loop {
            if self.filled > 0 {
                got_any = true;
                if let Some(head) = self.parse_head(head_request)? {
                    // Not this request's answer (a front-end closing an idle connection may
                    // say 408 first): none of the request had gone out.
                    if self.stream.withdraw(self.request_at) {
                        return Err(ExchangeError::Unsent(io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!(
                                "the front-end answered {} before it had the request",
                                head.0.status
                            ),
                        )));
                    }
                    let (parts, framing, keep_alive) = head;
                    let mut body = ResponseBody {
                        conn: self,
                        framing,
                        keep_alive,
                        whole: None,
                    };
                    body.settle();
                    body.gather();
                    return Ok((parts, body));
                }
                if self.filled >= MAX_HEAD {
                    return Err(ExchangeError::Invalid(format!(
                        "its head is larger than {} KiB",
                        MAX_HEAD / 1024
                    )));
                }
            }
            let read = std::future::poll_fn(|cx| self.poll_fill(cx)).await;
            match read {
                Ok(0) if got_any => {
                    return Err(ExchangeError::Invalid(
                        "the connection closed in the middle of its head".into(),
                    ));
                }
                Ok(0) if self.stream.withdraw(self.request_at) => {
                    return Err(ExchangeError::Unsent(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the connection was closed",
                    )));
                }
                Ok(0) => {
                    return Err(ExchangeError::NoResponse(
                        "the connection was closed".into(),
                    ));
                }
                Ok(_) => {}
                Err(e) if got_any => {
                    return Err(ExchangeError::Invalid(format!(
                        "reading its head failed: {e}"
                    )));
                }
                Err(e) if self.stream.withdraw(self.request_at) => {
                    return Err(ExchangeError::Unsent(e));
                }
                Err(e) => return Err(ExchangeError::NoResponse(format!("{e}"))),
            }
        }
    }

    /// One response head from the buffer, consumed: `None` when it is not complete yet. Interim
    /// `1xx` answers are consumed and skipped.
    #[allow(clippy::type_complexity)]
    fn parse_head(
        &mut self,
        head_request: bool,
    ) -> Result<Option<(http::response::Parts, Framing, bool)>, ExchangeError> {
        loop {
            // Few headers on the stack; many only when a response has them.
            let mut slots = [httparse::EMPTY_HEADER; FEW_HEADERS];
            let mut more;
            let data = &self.buf[..self.filled];
            let mut response = httparse::Response::new(&mut slots);
            let mut parsed = response.parse(data);
            if let Err(httparse::Error::TooManyHeaders) = parsed {
                more = vec![httparse::EMPTY_HEADER; MAX_HEADERS];
                response = httparse::Response::new(&mut more);
                parsed = response.parse(data);
            }
            let length = match parsed {
                Ok(httparse::Status::Complete(length)) => length,
                Ok(httparse::Status::Partial) => return Ok(None),
                Err(e) => return Err(ExchangeError::Invalid(e.to_string())),
            };
            let code = response.code.unwrap_or_default();
            let status = StatusCode::from_u16(code)
                .map_err(|_| ExchangeError::Invalid(format!("status {code}")))?;
            if status == StatusCode::SWITCHING_PROTOCOLS {
                return Err(ExchangeError::Invalid(
                    "101 Switching Protocols: the balancer forwards no protocol upgrade".into(),
                ));
            }
            if status.is_informational() {
                let _ = self.buf.split_to(length);
                self.filled -= length;
                continue;
            }
            let http11 = response.version == Some(1);
            let base = data.as_ptr() as usize;
            let fields = &mut self.fields;
            fields.clear();
            let mut keep_alive = http11;
            let mut named: Vec<HeaderName> = Vec::new();
            let mut content_length: Option<u64> = None;
            let mut chunked = None;
            for h in response.headers.iter() {
                let name = HeaderName::from_bytes(h.name.as_bytes())
                    .map_err(|_| ExchangeError::Invalid(format!("header name {:?}", h.name)))?;
                if name == header::CONNECTION {
                    for token in h.value.split(|b| *b == b',') {
                        let token = token.trim_ascii();
                        if token.eq_ignore_ascii_case(b"close") {
                            keep_alive = false;
                        } else if token.eq_ignore_ascii_case(b"keep-alive") {
                            keep_alive |= !http11;
                        } else if let Ok(name) = HeaderName::from_bytes(token) {
                            named.push(name);
                        }
                    }
                    continue;
                }
                if name == header::TRANSFER_ENCODING {
                    // The last coding decides; anything but chunked ends with the connection.
                    let last = h.value.rsplit(|b| *b == b',').next().unwrap_or_default();
                    chunked = Some(last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
                    continue;
                }
                if name == header::CONTENT_LENGTH {
                    for value in h.value.split(|b| *b == b',') {
                        let parsed = std::str::from_utf8(value.trim_ascii())
                            .ok()
                            .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                            .and_then(|v| v.parse::<u64>().ok());
                        match (parsed, content_length) {
                            (Some(n), None) => content_length = Some(n),
                            (Some(n), Some(m)) if n == m => {}
                            _ => {
                                return Err(ExchangeError::Invalid(
                                    "its Content-Length is not one number".into(),
                                ));
                            }
                        }
                    }
                }
                if is_hop_by_hop(&name) {
                    continue;
                }
                let start = h.value.as_ptr() as usize - base;
                fields.push((name, start, start + h.value.len()));
            }
            let head = self.buf.split_to(length).freeze();
            self.filled -= length;
            let mut headers = HeaderMap::with_capacity(self.fields.len());
            for (name, start, end) in self.fields.drain(..) {
                if named.contains(&name) {
                    continue;
                }
                let value = HeaderValue::from_maybe_shared(head.slice(start..end))
                    .map_err(|_| ExchangeError::Invalid(format!("the value of {name}")))?;
                headers.append(name, value);
            }
            let framing = if head_request
                || status == StatusCode::NO_CONTENT
                || status == StatusCode::NOT_MODIFIED
            {
                Framing::Length(0)
            } else if let Some(chunked) = chunked {
                // Transfer-Encoding wins over Content-Length; such a connection is not reused.
                keep_alive &= content_length.is_none() && chunked;
                // The body's length is not the front-end's Content-Length here: hyper frames it
                // towards the client by what is relayed.
                headers.remove(header::CONTENT_LENGTH);
                if chunked {
                    Framing::Chunked(Chunk::Size)
                } else {
                    Framing::Close
                }
            } else if let Some(length) = content_length {
                Framing::Length(length)
            } else {
                keep_alive = false;
                Framing::Close
            };
            let mut parts = http::Response::new(()).into_parts().0;
            parts.status = status;
            // The version towards the client is the balancer's own (keep-alive included),
            // whatever the front-end spoke.
            parts.version = Version::HTTP_11;
            parts.headers = headers;
            return Ok(Some((parts, framing, keep_alive)));
        }
    }

    /// Reads more into the buffer; `Ok(0)` is the end of the connection.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.buf.len() - self.filled < 1024 {
            // Keeps what is unread and gets new room: in place when the bytes handed out
            // earlier are gone, in a new allocation otherwise.
            self.buf.truncate(self.filled);
            self.buf.reserve(READ_ROOM);
            let room = self.buf.capacity().min(self.filled + 4 * READ_ROOM);
            self.buf.resize(room, 0);
        }
        let mut read = ReadBuf::new(&mut self.buf[self.filled..]);
        ready!(Pin::new(&mut self.stream).poll_read(cx, &mut read))?;
        let n = read.filled().len();
        self.filled += n;
        Poll::Ready(Ok(n))
    }

    /// Up to `max` unread bytes, consumed.
    fn take(&mut self, max: u64) -> Bytes {
        let n = self.filled.min(usize::try_from(max).unwrap_or(usize::MAX));
        self.filled -= n;
        self.buf.split_to(n).freeze()
    }
}

/// Headers that describe one connection, not the message: never forwarded.
pub fn is_hop_by_hop(name: &HeaderName) -> bool {
    *name == header::CONNECTION
        || *name == header::TRANSFER_ENCODING
        || *name == header::TE
        || *name == header::UPGRADE
        || name.as_str() == "keep-alive"
        || name.as_str() == "proxy-connection"
}

/// How the response body ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// This many bytes are still to come.
    Length(u64),
    Chunked(Chunk),
    /// Everything until the front-end closes the connection.
    Close,
    /// Complete.
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// A chunk-size line is next.
    Size,
    /// This many bytes of chunk data are still to come.
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    /// The trailer section after the last chunk.
    Trailers,
}

/// A front-end's response body, read from its connection as it is polled.
pub struct ResponseBody {
    conn: Connection,
    framing: Framing,
    keep_alive: bool,
    /// A chunked body that arrived whole with its head, decoded (see [`ResponseBody::gather`]).
    whole: Option<Bytes>,
}

impl ResponseBody {
    /// Marks an empty remainder as complete, so that `is_end_stream` says so at once.
    fn settle(&mut self) {
        if self.framing == Framing::Length(0) {
            self.framing = Framing::Done;
        }
    }

    /// A chunked body that is already whole in the buffer (and has no trailers) is decoded at
    /// once: the client gets it with a `Content-Length` in one write, and the connection is free
    /// before the body is relayed. Anything else, malformed included, is left to `poll_frame`.
    fn gather(&mut self) {
        if self.framing != Framing::Chunked(Chunk::Size) {
            return;
        }
        let data = &self.conn.buf[..self.conn.filled];
        let mut at = 0;
        let mut pieces: Vec<(usize, usize)> = Vec::new();
        loop {
            let Ok(httparse::Status::Complete((used, size))) =
                httparse::parse_chunk_size(&data[at..])
            else {
                return;
            };
            at += used;
            if size == 0 {
                if data[at..].starts_with(b"\r\n") {
                    at += 2;
                    break;
                }
                return;
            }
            // Within the buffer, so that `end + 2` cannot overflow whatever size was announced.
            let Some(end) = usize::try_from(size)
                .ok()
                .and_then(|s| at.checked_add(s))
                .filter(|&end| end < data.len())
            else {
                return;
            };
            if data.get(end..end + 2) != Some(&b"\r\n"[..]) {
                return;
            }
            pieces.push((at, end));
            at = end + 2;
        }
        let raw = self.conn.buf.split_to(at).freeze();
        self.conn.filled -= at;
        self.framing = Framing::Done;
        self.whole = match pieces.as_slice() {
            [] => None,
            [(start, end)] => Some(raw.slice(*start..*end)),
            _ => {
                let mut joined = BytesMut::with_capacity(pieces.iter().map(|(s, e)| e - s).sum());
                for (start, end) in pieces {
                    joined.extend_from_slice(&raw[start..end]);
                }
                Some(joined.freeze())
            }
        };
    }

    /// Never gives the connection back (the exchange went wrong on the way).
    pub fn forbid_reuse(&mut self) {
        self.keep_alive = false;
    }

    /// The connection, when the exchange ended cleanly and it can carry another one.
    pub fn into_connection(self) -> Option<Connection> {
        let mut conn = self.conn;
        (self.framing == Framing::Done && self.keep_alive && conn.filled == 0).then(|| {
            conn.reused = true;
            conn
        })
    }

    /// The whole body, at most `limit` bytes, and the connection if it can be reused.
    pub async fn collect(mut self, limit: usize) -> Result<(Bytes, Option<Connection>), String> {
        let mut all = BytesMut::new();
        while let Some(frame) = self.frame().await {
            let frame = frame.map_err(|e| e.to_string())?;
            if let Ok(data) = frame.into_data() {
                if all.len() + data.len() > limit {
                    return Err(format!("the body is larger than {limit} bytes"));
                }
                all.extend_from_slice(&data);
            }
        }
        Ok((all.freeze(), self.into_connection()))
    }

    fn poll_chunked(
        &mut self,
        cx: &mut Context<'_>,
        mut state: Chunk,
    ) -> Poll<Option<io::Result<Frame<Bytes>>>> {
        loop {
            let conn = &mut self.conn;
            match state {
                Chunk::Size => match httparse::parse_chunk_size(&conn.buf[..conn.filled]) {
                    Ok(httparse::Status::Complete((used, size))) => {
                        let _ = conn.take(used as u64);
                        state = if size == 0 {
                            Chunk::Trailers
                        } else {
                            Chunk::Data(size)
                        };
                        continue;
                    }
                    Ok(httparse::Status::Partial) if conn.filled < 4096 => {}
                    _ => return Poll::Ready(Some(Err(invalid("a chunk size line")))),
                },
                Chunk::Data(left) if conn.filled > 0 => {
                    let data = conn.take(left);
                    let left = left - data.len() as u64;
                    self.framing = Framing::Chunked(if left == 0 {
                        Chunk::DataEnd
                    } else {
                        Chunk::Data(left)
                    });
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Chunk::Data(_) => {}
                Chunk::DataEnd => match &conn.buf[..conn.filled.min(2)] {
                    b"\r\n" => {
                        let _ = conn.take(2);
                        state = Chunk::Size;
                        continue;
                    }
                    b"\r" | b"" => {}
                    _ => return Poll::Ready(Some(Err(invalid("the end of a chunk")))),
                },
                Chunk::Trailers => {
                    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
                    match httparse::parse_headers(&conn.buf[..conn.filled], &mut slots) {
                        Ok(httparse::Status::Complete((used, fields))) => {
                            let mut trailers = HeaderMap::new();
                            for f in fields {
                                if let (Ok(name), Ok(value)) = (
                                    HeaderName::from_bytes(f.name.as_bytes()),
                                    HeaderValue::from_bytes(f.value),
                                ) {
                                    trailers.append(name, value);
                                }
                            }
                            let _ = conn.take(used as u64);
                            self.framing = Framing::Done;
                            if trailers.is_empty() {
                                return Poll::Ready(None);
                            }
                            return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                        }
                        Ok(httparse::Status::Partial) if conn.filled < MAX_HEAD => {}
                        _ => return Poll::Ready(Some(Err(invalid("the trailers")))),
                    }
                }
            }
            // More bytes are needed.
            self.framing = Framing::Chunked(state);
            if ready!(self.conn.poll_fill(cx))? == 0 {
                return Poll::Ready(Some(Err(ended_early())));
            }
        }
    }
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("the front-end sent an invalid chunked body: {what}"),
    )
}

fn ended_early() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "the front-end closed the connection before the end of the body",
    )
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<io::Result<Frame<Bytes>>>> {
        let this = self.get_mut();
        if let Some(whole) = this.whole.take() {
            return Poll::Ready(Some(Ok(Frame::data(whole))));
        }
        loop {
            match this.framing {
                Framing::Done => return Poll::Ready(None),
                Framing::Length(0) => {
                    this.framing = Framing::Done;
                    return Poll::Ready(None);
                }
                Framing::Length(left) if this.conn.filled > 0 => {
                    let data = this.conn.take(left);
                    this.framing = Framing::Length(left - data.len() as u64);
                    this.settle();
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Framing::Close if this.conn.filled > 0 => {
                    let data = this.conn.take(u64::MAX);
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Framing::Chunked(state) => return this.poll_chunked(cx, state),
                Framing::Length(_) | Framing::Close => {
                    if ready!(this.conn.poll_fill(cx))? == 0 {
                        if this.framing == Framing::Close {
                            this.framing = Framing::Done;
                            return Poll::Ready(None);
                        }
                        return Poll::Ready(Some(Err(ended_early())));
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.framing == Framing::Done && self.whole.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Done => {
                SizeHint::with_exact(self.whole.as_ref().map_or(0, |w| w.len() as u64))
            }
            Framing::Length(left) => SizeHint::with_exact(left),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt as _;
    use tokio::net::TcpListener;

    /// A front-end on a port of its own that does `serve` with the one connection it accepts:
    /// its address, and what `serve` gives.
    async fn front_end<F, T>(
        serve: impl FnOnce(TcpStream) -> F + Send + 'static,
    ) -> (String, tokio::task::JoinHandle<T>)
    where
        F: std::future::Future<Output = T> + Send + 'static,
        T: Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let served = tokio::spawn(async move {
            let (socket, _) = listener.accept().await.unwrap();
            serve(socket).await
        });
        (address, served)
    }

    /// Waits until `conn` is no longer taken for open, for what the front-end did (`what`).
    async fn until_not_open(conn: &Connection, what: &str) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while conn.is_open() {
            assert!(tokio::time::Instant::now() < deadline, "{what} never seen");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// A front-end that answers the first request on a connection with `answer`, written in
    /// pieces of `piece` bytes, and then keeps the connection open (`keep`) or closes it.
    async fn serve(answer: &'static [u8], piece: usize, keep: bool) -> String {
        let (address, _) = front_end(move |mut socket| async move {
            let mut request = vec![0u8; 4096];
            let _ = socket.read(&mut request).await.unwrap();
            for part in answer.chunks(piece) {
                socket.write_all(part).await.unwrap();
                socket.flush().await.unwrap();
                tokio::task::yield_now().await;
            }
            if keep {
                let _ = socket.read(&mut request).await;
            }
        })
        .await;
        address
    }

    /// A request to a front-end answering `answer` (see [`serve`]): the response head and body.
    async fn get(
        answer: &'static [u8],
        piece: usize,
        keep: bool,
        head_request: bool,
    ) -> Result<(http::response::Parts, ResponseBody), ExchangeError> {
        let mut conn = queued_to(&serve(answer, piece, keep).await).await;
        conn.write_head(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        conn.read_response(head_request).await
    }

    /// A connection to `address` whose request heads are queued with a loop's sends.
    async fn queued_to(address: &str) -> Connection {
        let sends = Sends::start(Duration::from_secs(5));
        Connection::connect(address, Duration::from_secs(1), Some(&sends))
            .await
            .unwrap()
    }

    /// A POST on `conn` that gets no answer: how the exchange failed.
    async fn unanswered_post(mut conn: Connection) -> ExchangeError {
        conn.write_head(b"POST /order HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n")
            .await
            .unwrap();
        match conn.read_response(false).await {
            Err(e) => e,
            Ok((parts, _)) => panic!("answered {}", parts.status),
        }
    }

    /// [`get`], with the body read whole: its frames and whether the connection is reusable.
    async fn exchange(
        answer: &'static [u8],
        piece: usize,
        keep: bool,
        head_request: bool,
    ) -> Result<(http::response::Parts, Vec<Frame<Bytes>>, bool), String> {
        let (parts, mut body) = get(answer, piece, keep, head_request)
            .await
            .map_err(|e| e.to_string())?;
        let mut frames = Vec::new();
        while let Some(frame) = body.frame().await {
            frames.push(frame.map_err(|e| e.to_string())?);
        }
        Ok((parts, frames, body.into_connection().is_some()))
    }

    fn data(frames: &[Frame<Bytes>]) -> Vec<u8> {
        frames
            .iter()
            .filter_map(|f| f.data_ref())
            .flat_map(|d| d.iter().copied())
            .collect()
    }

    #[tokio::test]
    async fn length_delimited_bodies_in_any_split_keep_the_connection() {
        for piece in [1, 7, 1000] {
            let (parts, frames, reusable) = exchange(
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: keep-alive\r\nx-a: 1\r\n\r\nhello",
                piece,
                true,
                false,
            )
            .await
            .unwrap();
            assert_eq!(parts.status, 200);
            assert_eq!(parts.headers["x-a"], "1");
            assert_eq!(parts.headers["content-length"], "5");
            assert!(!parts.headers.contains_key("connection"));
            assert_eq!(data(&frames), b"hello");
            assert!(reusable, "piece {piece}");
        }
    }

    #[tokio::test]
    async fn chunked_bodies_are_decoded_with_their_trailers() {
        for piece in [1, 3, 1000] {
            let (parts, frames, reusable) = exchange(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n1\r\n!\r\n0\r\nx-sum: 6\r\n\r\n",
                piece,
                true,
                false,
            )
            .await
            .unwrap();
            assert!(!parts.headers.contains_key("transfer-encoding"));
            assert_eq!(data(&frames), b"hello!");
            let trailers = frames.iter().find_map(|f| f.trailers_ref()).unwrap();
            assert_eq!(trailers["x-sum"], "6");
            assert!(reusable, "piece {piece}");
        }
    }

    #[tokio::test]
    async fn a_chunked_body_that_arrived_whole_is_relayed_with_its_length() {
        // The whole answer is one write, so it arrives with its head.
        let (_, mut body) = get(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n1\r\n!\r\n0\r\n\r\n",
            1000,
            true,
            false,
        )
        .await
        .unwrap();
        assert_eq!(body.size_hint().exact(), Some(6));
        let frame = body.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "hello!");
        assert!(body.is_end_stream());
        assert!(body.frame().await.is_none());
        assert!(body.into_connection().is_some());
    }

    #[tokio::test]
    async fn a_chunk_size_at_the_end_of_the_address_space_is_refused_without_overflow() {
        // Sizes that put the chunk's end at the last addresses, wherever the body starts in the
        // buffer: the bounds check must refuse them, not wrap around.
        for below_max in 0..96usize {
            let size = usize::MAX - below_max;
            let answer =
                format!("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n{size:x}\r\nabc\r\n");
            let answer: &'static [u8] = Box::leak(answer.into_bytes().into_boxed_slice());
            let outcome = exchange(answer, 1000, false, false).await;
            assert!(outcome.is_err(), "size {size:x}: {outcome:?}");
        }
    }

    #[tokio::test]
    async fn interim_answers_are_skipped_and_empty_bodies_are_empty() {
        let (parts, frames, reusable) = exchange(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\nx-b: 2\r\n\r\n",
            4,
            true,
            false,
        )
        .await
        .unwrap();
        assert_eq!(parts.status, 204);
        assert_eq!(parts.headers["x-b"], "2");
        assert!(frames.is_empty());
        assert!(reusable);
        // A response to HEAD has no body whatever its Content-Length says.
        let (parts, frames, reusable) = exchange(
            b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n",
            100,
            true,
            true,
        )
        .await
        .unwrap();
        assert_eq!(parts.headers["content-length"], "50");
        assert!(frames.is_empty());
        assert!(reusable);
    }

    #[tokio::test]
    async fn a_body_without_framing_ends_with_the_connection_which_is_not_reused() {
        let (_, frames, reusable) = exchange(
            b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it",
            4,
            false,
            false,
        )
        .await
        .unwrap();
        assert_eq!(data(&frames), b"all of it");
        assert!(!reusable);
        // A transfer coding other than chunked: read to the end too, and the front-end's
        // Content-Length (not the body's length) is not relayed.
        let (parts, frames, reusable) = exchange(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nContent-Length: 3\r\n\r\nlonger than 3",
            4,
            false,
            false,
        )
        .await
        .unwrap();
        assert_eq!(data(&frames), b"longer than 3");
        assert!(!parts.headers.contains_key("content-length"));
        assert!(!reusable);
    }

    #[tokio::test]
    async fn an_http10_front_end_keeps_its_connection_only_when_it_says_so() {
        let (parts, frames, reusable) = exchange(
            b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
            100,
            true,
            false,
        )
        .await
        .unwrap();
        assert_eq!(data(&frames), b"ok");
        assert!(!reusable);
        assert_eq!(
            parts.version,
            Version::HTTP_11,
            "the client side stays HTTP/1.1"
        );
        let (_, _, reusable) = exchange(
            b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok",
            100,
            true,
            false,
        )
        .await
        .unwrap();
        assert!(reusable);
    }

    #[tokio::test]
    async fn broken_responses_are_named() {
        let cases: [(&'static [u8], bool, &str); 7] = [
            (b"", false, "closed before any response byte"),
            (
                b"HTTP/1.1 200 OK\r\nContent-Le",
                false,
                "middle of its head",
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhel",
                false,
                "before the end of the body",
            ),
            (
                // A front-end whose app failed after its head closes before the last chunk.
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
                false,
                "before the end of the body",
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\nhello",
                true,
                "not one number",
            ),
            (
                b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
                true,
                "no protocol upgrade",
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
                true,
                "chunk size",
            ),
        ];
        for (answer, keep, expected) in cases {
            let error = exchange(answer, 1000, keep, false).await.unwrap_err();
            assert!(error.contains(expected), "{error} (expected {expected})");
        }
    }

    #[tokio::test]
    async fn a_closed_pooled_connection_is_seen_before_use() {
        let (_, body) = get(
            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
            100,
            false,
            false,
        )
        .await
        .unwrap();
        let conn = body.into_connection().unwrap();
        // The front-end closes it; once the event arrives, the pool sees it.
        until_not_open(&conn, "the close").await;
    }

    #[tokio::test]
    async fn a_head_the_front_end_had_before_it_closed_is_not_taken_for_unsent() {
        // Reads the whole head, then closes without an answer.
        let (address, _) = front_end(|mut socket| async move {
            let mut got = Vec::new();
            let mut buf = [0u8; 1024];
            while !got.ends_with(b"\r\n\r\n") {
                let n = socket.read(&mut buf).await.unwrap();
                assert!(n > 0, "the head never came");
                got.extend_from_slice(&buf[..n]);
            }
        })
        .await;
        // Sending it again elsewhere could make two orders.
        match unanswered_post(queued_to(&address).await).await {
            ExchangeError::NoResponse(_) => {}
            e => panic!("not taken for sent without an answer: {e}"),
        }
    }

    #[tokio::test]
    async fn an_answer_that_came_before_the_queued_head_went_out_is_not_taken_for_its_answer() {
        // Closing an idle connection, it says so first.
        let (address, _) = front_end(|mut socket| async move {
            socket
                .write_all(b"HTTP/1.1 408 Request Timeout\r\nconnection: close\r\ncontent-length: 0\r\n\r\n")
                .await
                .unwrap();
            let mut rest = Vec::new();
            let _ = socket.read_to_end(&mut rest).await;
        })
        .await;
        let conn = queued_to(&address).await;
        until_not_open(&conn, "the 408").await;
        match unanswered_post(conn).await {
            ExchangeError::Unsent(e) => assert!(e.to_string().contains("408"), "{e}"),
            e => panic!("not taken for unsent: {e}"),
        }
    }

    #[tokio::test]
    async fn a_head_queued_on_a_connection_found_closed_is_unsent_and_never_goes_out() {
        // Says it closes, and still reads: what it gets is what the balancer sent after.
        let (address, received) = front_end(|mut socket| async move {
            socket.shutdown().await.unwrap();
            let mut got = Vec::new();
            socket.read_to_end(&mut got).await.unwrap();
            got
        })
        .await;
        let conn = queued_to(&address).await;
        until_not_open(&conn, "the close").await;
        // The close is known when the response is read, before the loop's turn sends the head.
        match unanswered_post(conn).await {
            ExchangeError::Unsent(_) => {}
            e => panic!("not taken for unsent: {e}"),
        }
        assert_eq!(received.await.unwrap(), b"");
    }
}
