//! A loop turn's sends to clients, written together.
//!
//! Each client connection is a task of its own, so left to itself the balancer would send each
//! response the moment its task has it, between the handling of the next request and the next:
//! the client (and whatever shares its CPU) is then woken for about each response. Measured
//! against HAProxy, which reads every ready socket of a loop turn before sending anything, a
//! load generator on the other CPU went back to the kernel 3–4 times as often per request
//! (`bench/balancer-wakeups.sh`, `bench/RESULTS.md`).
//!
//! Here a small write is queued on the connection's [`Stream`], which answers at once, and the
//! loop's [`Sends`] task writes every queued connection after the tasks the loop had ready when
//! the first one was queued: one burst per turn, with no extra poll of the connection tasks.
//! Large writes (bulk bodies) go straight to the socket, after whatever is queued before them.
//!
//! Invariants: bytes reach the socket in the order they were written; a `flush` answers ready
//! only when nothing is left or the rest goes out in this turn; what the socket cannot take now
//! is written by the connection's own task, which waits for room like any writer (so the send
//! timeout sees a client that reads nothing); an error of a queued write is returned by the
//! connection's next write or flush, and wakes its task.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Notify;

/// Writes up to this size are queued; larger ones go to the socket at once.
const QUEUED_WRITE: usize = 16 * 1024;
/// Most bytes a connection holds queued.
const QUEUED_MOST: usize = 64 * 1024;
/// A connection's queue keeps its allocation up to this size between turns.
const KEPT_CAPACITY: usize = 16 * 1024;

/// One event loop's queued sends, and the task that writes them.
pub struct Sends {
    queued: Mutex<Vec<Arc<Mutex<Out>>>>,
    notify: Notify,
}

/// Stops the loop's sending task when the loop ends.
pub struct Sending(tokio::task::JoinHandle<()>);

impl Drop for Sending {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Sends {
    /// The current event loop's queue; its task runs until the returned [`Sending`] is dropped
    /// (after the loop's connections ended: a connection's last bytes go out before that, as
    /// its shutdown flushes them).
    pub fn start() -> (Arc<Sends>, Sending) {
        let sends = Arc::new(Sends {
            queued: Mutex::new(Vec::new()),
            notify: Notify::new(),
        });
        let task = tokio::spawn(sends.clone().write_queued());
        (sends, Sending(task))
    }

    /// A client connection whose small writes go out with the loop turn's others.
    pub fn stream(self: &Arc<Self>, stream: TcpStream) -> Stream {
        Stream {
            out: Arc::new(Mutex::new(Out {
                stream,
                bytes: Vec::new(),
                queued: false,
                error: None,
                waker: None,
            })),
            sends: self.clone(),
        }
    }

    fn queue(&self, out: Arc<Mutex<Out>>) {
        let mut queued = lock(&self.queued);
        queued.push(out);
        // The first of a turn: the task goes behind the tasks the loop has ready now.
        if queued.len() == 1 {
            self.notify.notify_one();
        }
    }

    async fn write_queued(self: Arc<Self>) {
        let mut turn = Vec::new();
        loop {
            self.notify.notified().await;
            std::mem::swap(&mut turn, &mut *lock(&self.queued));
            for out in turn.drain(..) {
                lock(&out).write_queued();
            }
        }
    }
}

/// A connection's bytes not yet on the socket, and the socket (shared with the loop's sending
/// task, which may outlive the connection's own handle by one turn).
struct Out {
    stream: TcpStream,
    bytes: Vec<u8>,
    /// In the loop's queue: its bytes go out this turn.
    queued: bool,
    /// A queued write failed: the connection is broken.
    error: Option<io::Error>,
    /// The connection's task, woken when the queued bytes could not all go out.
    waker: Option<Waker>,
}

impl Out {
    fn failed(&self) -> Option<io::Error> {
        self.error
            .as_ref()
            .map(|e| io::Error::new(e.kind(), e.to_string()))
    }

    /// The sending task's part: as much as the socket takes now, without waiting.
    fn write_queued(&mut self) {
        self.queued = false;
        while !self.bytes.is_empty() {
            match self.stream.try_write(&self.bytes) {
                Ok(0) => {
                    self.error = Some(io::ErrorKind::WriteZero.into());
                    break;
                }
                Ok(n) => {
                    self.bytes.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.error = Some(e);
                    break;
                }
            }
        }
        if self.bytes.is_empty() && self.error.is_none() {
            if self.bytes.capacity() > KEPT_CAPACITY {
                self.bytes = Vec::new();
            }
        } else if let Some(waker) = self.waker.take() {
            // The rest is the connection's to write (or to fail on).
            waker.wake();
        }
    }

    /// The connection's part: what is left, waiting for room.
    fn poll_write_left(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.bytes.is_empty() {
            match ready!(Pin::new(&mut self.stream).poll_write(cx, &self.bytes)) {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Ok(n) => {
                    self.bytes.drain(..n);
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Whether a write of `len` bytes is queued rather than written.
    fn queues(&self, len: usize) -> bool {
        len <= QUEUED_WRITE
            && (self.queued || self.bytes.is_empty())
            && self.bytes.len() + len <= QUEUED_MOST
    }

    fn remember(&mut self, cx: &Context<'_>) {
        if !self.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            self.waker = Some(cx.waker().clone());
        }
    }
}

/// A client's TCP connection whose small writes are queued for the loop's [`Sends`].
pub struct Stream {
    out: Arc<Mutex<Out>>,
    sends: Arc<Sends>,
}

impl Stream {
    fn queued(&self, out: &mut Out, cx: &Context<'_>) {
        out.remember(cx);
        if !out.queued {
            out.queued = true;
            self.sends.queue(self.out.clone());
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing in this module panics while holding a lock; a poisoned one is still consistent.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut lock(&self.out).stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &*self;
        let mut out = lock(&this.out);
        if let Some(e) = out.failed() {
            return Poll::Ready(Err(e));
        }
        if out.queues(buf.len()) {
            out.bytes.extend_from_slice(buf);
            this.queued(&mut out, cx);
            return Poll::Ready(Ok(buf.len()));
        }
        ready!(out.poll_write_left(cx))?;
        Pin::new(&mut out.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &*self;
        let mut out = lock(&this.out);
        if let Some(e) = out.failed() {
            return Poll::Ready(Err(e));
        }
        let len = bufs.iter().map(|b| b.len()).sum();
        if out.queues(len) {
            for buf in bufs {
                out.bytes.extend_from_slice(buf);
            }
            this.queued(&mut out, cx);
            return Poll::Ready(Ok(len));
        }
        ready!(out.poll_write_left(cx))?;
        Pin::new(&mut out.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut out = lock(&self.out);
        if let Some(e) = out.failed() {
            return Poll::Ready(Err(e));
        }
        if out.queued {
            out.remember(cx);
            return Poll::Ready(Ok(()));
        }
        out.poll_write_left(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut out = lock(&self.out);
        if let Some(e) = out.failed() {
            return Poll::Ready(Err(e));
        }
        ready!(out.poll_write_left(cx))?;
        Pin::new(&mut out.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A queued stream and the plain socket at its other end.
    async fn pair(sends: &Arc<Sends>) -> (Stream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let connecting = TcpStream::connect(listener.local_addr().unwrap());
        let (accepted, connected) = tokio::join!(listener.accept(), connecting);
        (sends.stream(accepted.unwrap().0), connected.unwrap())
    }

    fn nothing_yet(peer: &TcpStream) -> bool {
        let mut byte = [0; 1];
        matches!(peer.try_read(&mut byte), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }

    async fn read_to_end(mut peer: TcpStream) -> Vec<u8> {
        let mut got = Vec::new();
        peer.read_to_end(&mut got).await.unwrap();
        got
    }

    #[tokio::test]
    async fn small_writes_wait_for_the_turn_and_keep_their_order_with_large_ones() {
        let (sends, _sending) = Sends::start();
        let (mut a, peer_a) = pair(&sends).await;
        let (mut b, peer_b) = pair(&sends).await;
        a.write_all(b"one ").await.unwrap();
        a.flush().await.unwrap();
        b.write_all(b"other").await.unwrap();
        a.write_all(b"two ").await.unwrap();
        // Queued, not sent: the sending task has not had its turn.
        assert!(nothing_yet(&peer_a) && nothing_yet(&peer_b));
        tokio::task::yield_now().await;
        // Bulk goes straight to the socket, after what was queued before it.
        let bulk = vec![b'x'; 2 * QUEUED_WRITE];
        a.write_all(&bulk).await.unwrap();
        a.write_all(b" three").await.unwrap();
        a.shutdown().await.unwrap();
        b.shutdown().await.unwrap();
        let mut expected = b"one two ".to_vec();
        expected.extend_from_slice(&bulk);
        expected.extend_from_slice(b" three");
        assert_eq!(read_to_end(peer_a).await, expected);
        assert_eq!(read_to_end(peer_b).await, b"other");
    }

    #[tokio::test]
    async fn bytes_queued_when_the_connection_is_dropped_still_go_out() {
        let (sends, _sending) = Sends::start();
        let (mut a, peer) = pair(&sends).await;
        a.write_all(b"last words").await.unwrap();
        drop(a);
        assert_eq!(read_to_end(peer).await, b"last words");
    }

    #[tokio::test]
    async fn a_client_that_reads_nothing_holds_the_writer_back_and_loses_nothing() {
        let (sends, _sending) = Sends::start();
        let (mut a, peer) = pair(&sends).await;
        // Small writes, each turn's sent by the sending task, until the socket is full and a
        // write has to wait for room.
        let mut written: u64 = 0;
        let mut chunk = [0u8; 1000];
        loop {
            for (i, byte) in chunk.iter_mut().enumerate() {
                *byte = ((written + i as u64) % 251) as u8;
            }
            let polled =
                std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut a).poll_write(cx, &chunk)))
                    .await;
            match polled {
                Poll::Ready(n) => written += n.unwrap() as u64,
                Poll::Pending => break,
            }
            tokio::task::yield_now().await;
            assert!(written < 1 << 30, "the writer was never held back");
        }
        assert!(lock(&a.out).bytes.len() <= QUEUED_MOST);
        let reading = tokio::spawn(read_to_end(peer));
        let mut rest = Vec::new();
        for i in 0..chunk.len() as u64 {
            rest.push(((written + i) % 251) as u8);
        }
        a.write_all(&rest).await.unwrap();
        a.shutdown().await.unwrap();
        let got = reading.await.unwrap();
        assert_eq!(got.len() as u64, written + rest.len() as u64);
        assert!(
            got.iter()
                .enumerate()
                .all(|(i, byte)| *byte == (i as u64 % 251) as u8)
        );
    }

    #[tokio::test]
    async fn a_queued_write_that_fails_fails_the_next_write() {
        let (sends, _sending) = Sends::start();
        let (mut a, peer) = pair(&sends).await;
        // The client resets the connection.
        rustix::net::sockopt::set_socket_linger(&peer, Some(std::time::Duration::ZERO)).unwrap();
        drop(peer);
        a.write_all(b"answer").await.unwrap();
        tokio::task::yield_now().await;
        let error = a.flush().await.unwrap_err();
        assert!(
            matches!(
                error.kind(),
                io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
            ),
            "{error}"
        );
        assert!(a.write_all(b"more").await.is_err());
    }
}
