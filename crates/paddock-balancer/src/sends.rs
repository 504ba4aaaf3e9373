//! A loop turn's sends, to clients and to front-ends, written together.
//!
//! Each client connection is a task of its own, so left to itself the balancer would send each
//! response the moment its task has it, between the handling of the next request and the next:
//! the client (and whatever shares its CPU) is then woken for about each response, and a
//! front-end for about each request. Measured against HAProxy, which reads every ready socket of
//! a loop turn before sending anything, a load generator on the other CPU went back to the
//! kernel 3–4 times as often per request (`bench/balancer-wakeups.sh`, `bench/RESULTS.md`).
//!
//! Here a small write is queued on the connection's [`Stream`], which answers at once, and the
//! loop's [`Sends`] task writes every queued connection after the tasks the loop had ready when
//! the first one was queued: one burst per turn, with no extra poll of the connection tasks.
//! Large writes (bulk bodies) go straight to the socket, after whatever is queued before them.
//!
//! Invariants: bytes reach the socket in the order they were written; a `flush` answers ready
//! only when nothing is left or the rest goes out in this turn; what the socket cannot take now
//! is written by the connection's own task, which waits for room like any writer, and every
//! byte the socket takes counts as progress for the send timeout ([`Stream::progress`]); an
//! error of a queued write is returned by the connection's next write or flush, or by a read
//! that would wait, and wakes its task; bytes left when the connection is dropped (hyper took
//! the queued flush as done, then closed the idle connection) are still written, by a task of
//! their own, until the client has taken nothing for the send timeout, counted from when the
//! connection began to wait; a connection with bytes waiting or a failed write is not taken for
//! open ([`Stream::is_open`]), so that a pool never queues a request behind another's tail.
//!
//! A connection to a front-end ([`Sends::front_end`]) differs in two ways: what is left when it
//! is dropped is not sent (the request it belonged to was given up, and may be sent again on
//! another connection), and a request whose bytes none reached the socket can be taken back
//! ([`Stream::withdraw`]), so that the request counts as not sent.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Notify;

/// Writes up to this size are queued; larger ones go to the socket at once.
const QUEUED_WRITE: usize = 16 * 1024;
/// Most bytes a connection holds queued.
const QUEUED_MOST: usize = 64 * 1024;
/// A connection's queue keeps its allocation up to this size between turns (an idle
/// keep-alive connection holds no more).
const KEPT_CAPACITY: usize = 4 * 1024;

/// One event loop's queued sends, and the task that writes them.
pub struct Sends {
    queued: Mutex<Vec<Arc<Mutex<Out>>>>,
    notify: Notify,
    /// How long the bytes of a dropped connection may wait for the client to take them.
    send_timeout: Duration,
}

impl Sends {
    /// The current event loop's queue. Its task runs as long as the runtime (never stopped
    /// while a connection of the loop may still queue).
    pub fn start(send_timeout: Duration) -> Arc<Sends> {
        let sends = Arc::new(Sends {
            queued: Mutex::new(Vec::new()),
            notify: Notify::new(),
            send_timeout,
        });
        tokio::spawn(sends.clone().write_queued());
        sends
    }

    /// A client connection whose small writes go out with the loop turn's others; what is left
    /// when it is dropped still goes out.
    pub fn client(self: &Arc<Self>, stream: TcpStream) -> Stream {
        Stream::new(stream, Some(self.clone()), true)
    }

    /// A connection to a front-end whose small writes go out with the loop turn's others; what
    /// is left when it is dropped does not (the request it belonged to was given up).
    pub fn front_end(self: &Arc<Self>, stream: TcpStream) -> Stream {
        Stream::new(stream, Some(self.clone()), false)
    }

    /// Writes what a dropped connection left, as the client takes it, until it has taken
    /// nothing for the send timeout (counted from when the connection began to wait, so a
    /// connection cut off for that reason is not given it twice); then the socket closes.
    fn linger(&self, out: Arc<Mutex<Out>>) -> Option<tokio::task::JoinHandle<()>> {
        let runtime = tokio::runtime::Handle::try_current().ok()?;
        let timeout = self.send_timeout;
        let lingering = runtime.spawn(async move {
            loop {
                let (since, sent) = {
                    let out = lock(&out);
                    (out.waiting_since, out.sent.load(Ordering::Relaxed))
                };
                let deadline = since.unwrap_or_else(tokio::time::Instant::now) + timeout;
                let written = std::future::poll_fn(|cx| lock(&out).poll_write_left(cx));
                match tokio::time::timeout_at(deadline, written).await {
                    Ok(_) => return,
                    Err(_) if lock(&out).sent.load(Ordering::Relaxed) == sent => return,
                    Err(_) => {}
                }
            }
        });
        Some(lingering)
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
                let orphaned = {
                    let mut queued = lock(&out);
                    queued.write_queued();
                    queued.orphaned && queued.left()
                };
                // Its connection is gone: nobody else will write the rest.
                if orphaned {
                    let _ = self.linger(out);
                }
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
    /// Bytes the socket took, by either writer.
    sent: Arc<AtomicU64>,
    /// Since when a write has waited for room with nothing taken (None while bytes move).
    waiting_since: Option<tokio::time::Instant>,
    /// The connection's handle was dropped.
    orphaned: bool,
    /// What is left when the handle is dropped is still written.
    linger: bool,
}

impl Out {
    fn failed(&self) -> Option<io::Error> {
        self.error
            .as_ref()
            .map(|e| io::Error::new(e.kind(), e.to_string()))
    }

    /// Bytes left to write by the connection (not queued, not failed).
    fn left(&self) -> bool {
        !self.queued && !self.bytes.is_empty() && self.error.is_none()
    }

    fn took(&mut self, n: usize) {
        self.bytes.drain(..n);
        self.sent.fetch_add(n as u64, Ordering::Relaxed);
        self.waiting_since = None;
        if self.bytes.is_empty() && self.bytes.capacity() > KEPT_CAPACITY {
            self.bytes = Vec::new();
        }
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
                Ok(n) => self.took(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.error = Some(e);
                    break;
                }
            }
        }
        // The rest is the connection's to write (or to fail on). With nothing left the waker is
        // let go: a pooled connection would keep a finished task's memory with it.
        let waker = self.waker.take();
        if (!self.bytes.is_empty() || self.error.is_some())
            && let Some(waker) = waker
        {
            waker.wake();
        }
    }

    /// The connection's part: what is left, waiting for room.
    fn poll_write_left(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.bytes.is_empty() {
            let Poll::Ready(written) = Pin::new(&mut self.stream).poll_write(cx, &self.bytes)
            else {
                self.waiting_since
                    .get_or_insert_with(tokio::time::Instant::now);
                return Poll::Pending;
            };
            match written {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Ok(n) => self.took(n),
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        Poll::Ready(Ok(()))
    }

    /// A write (`write`, plain or vectored) straight to the socket, after what is left.
    fn poll_write_now(
        &mut self,
        cx: &mut Context<'_>,
        write: impl FnOnce(Pin<&mut TcpStream>, &mut Context<'_>) -> Poll<io::Result<usize>>,
    ) -> Poll<io::Result<usize>> {
        if let Some(e) = self.failed() {
            return Poll::Ready(Err(e));
        }
        ready!(self.poll_write_left(cx))?;
        let written = ready!(write(Pin::new(&mut self.stream), cx))?;
        self.sent.fetch_add(written as u64, Ordering::Relaxed);
        Poll::Ready(Ok(written))
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

/// A TCP connection whose small writes are queued for its loop's [`Sends`] (without one, every
/// write goes to the socket at once).
pub struct Stream {
    out: Arc<Mutex<Out>>,
    sends: Option<Arc<Sends>>,
    /// `Out::sent`, read without the lock (it only grows).
    sent: Arc<AtomicU64>,
}

impl Drop for Stream {
    fn drop(&mut self) {
        // Queued, the sending task sees to the rest (it reads `orphaned` under the same lock).
        let left = {
            let mut out = lock(&self.out);
            out.orphaned = true;
            if !out.linger {
                out.bytes = Vec::new();
            }
            out.left()
        };
        if left && let Some(sends) = &self.sends {
            let _ = sends.linger(self.out.clone());
        }
    }
}

impl Stream {
    fn new(stream: TcpStream, sends: Option<Arc<Sends>>, linger: bool) -> Stream {
        let sent = Arc::new(AtomicU64::new(0));
        Stream {
            out: Arc::new(Mutex::new(Out {
                stream,
                bytes: Vec::new(),
                queued: false,
                error: None,
                waker: None,
                sent: sent.clone(),
                waiting_since: None,
                orphaned: false,
                linger,
            })),
            sends,
            sent,
        }
    }

    /// A connection whose writes all go to the socket at once (no loop queues for it).
    pub fn direct(stream: TcpStream) -> Stream {
        Stream::new(stream, None, false)
    }

    /// Whether it still looks usable: no write failed, nothing written waits to go out, the
    /// peer did not close it and sent nothing unasked (which stays to be read). Costs a system
    /// call only when the socket was signalled readable.
    pub fn is_open(&self) -> bool {
        let out = lock(&self.out);
        if out.error.is_some() || !out.bytes.is_empty() {
            return false;
        }
        // A peek: what the peer sent stays to be read.
        let mut probe = [0u8; 1];
        let mut cx = Context::from_waker(Waker::noop());
        out.stream
            .poll_peek(&mut cx, &mut ReadBuf::new(&mut probe))
            .is_pending()
    }

    /// The count of bytes sent once everything written so far is: where the next write
    /// starts, for [`Stream::withdraw`].
    pub fn end(&self) -> u64 {
        let out = lock(&self.out);
        out.sent.load(Ordering::Relaxed) + out.bytes.len() as u64
    }

    /// Takes back what was written from `from` (an [`Stream::end`]) on, if none of it reached
    /// the socket yet: whether it was taken back (then the peer cannot have seen any of it,
    /// and none of it will be sent).
    pub fn withdraw(&self, from: u64) -> bool {
        // Asked after every response: once any of it went out, the answer needs no lock.
        if self.sent.load(Ordering::Relaxed) > from {
            return false;
        }
        let mut out = lock(&self.out);
        let sent = out.sent.load(Ordering::Relaxed);
        if sent > from {
            return false;
        }
        let keep = usize::try_from(from - sent).unwrap_or(usize::MAX);
        out.bytes.truncate(keep);
        true
    }

    /// Writes to the socket at once (after whatever is queued before), like a plain socket: an
    /// error is this write's, or the earlier one's that broke the connection.
    pub async fn write_now(&self, buf: &[u8]) -> io::Result<usize> {
        std::future::poll_fn(|cx| {
            lock(&self.out).poll_write_now(cx, |stream, cx| stream.poll_write(cx, buf))
        })
        .await
    }

    /// [`Stream::write_now`] until all of `buf` is written.
    pub async fn write_all_now(&self, mut buf: &[u8]) -> io::Result<()> {
        while !buf.is_empty() {
            match self.write_now(buf).await? {
                0 => return Err(io::ErrorKind::WriteZero.into()),
                n => buf = &buf[n..],
            }
        }
        Ok(())
    }
    /// Counts the bytes the socket takes, whoever writes them: what the send timeout watches
    /// (a write that waits for room may have made progress meanwhile).
    pub fn progress(&self) -> Arc<AtomicU64> {
        self.sent.clone()
    }

    /// Queues `len` bytes that `append` adds, when they are to be queued: whether they were.
    fn queue(
        &self,
        out: &mut Out,
        cx: &Context<'_>,
        len: usize,
        append: impl FnOnce(&mut Vec<u8>),
    ) -> bool {
        let Some(sends) = &self.sends else {
            return false;
        };
        if out.error.is_some() || !out.queues(len) {
            return false;
        }
        append(&mut out.bytes);
        out.remember(cx);
        if !out.queued {
            out.queued = true;
            sends.queue(self.out.clone());
        }
        true
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
        let mut out = lock(&self.out);
        // A task that only reads now (a TLS handshake) still writes its leftover as room comes.
        if out.left()
            && let Poll::Ready(Err(e)) = out.poll_write_left(cx)
        {
            out.error = Some(e);
        }
        match Pin::new(&mut out.stream).poll_read(cx, buf) {
            // What was sent failed, and nothing came: the connection is broken.
            Poll::Pending => match out.failed() {
                Some(e) => Poll::Ready(Err(e)),
                None => Poll::Pending,
            },
            read => read,
        }
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
        if this.queue(&mut out, cx, buf.len(), |b| b.extend_from_slice(buf)) {
            return Poll::Ready(Ok(buf.len()));
        }
        out.poll_write_now(cx, |stream, cx| stream.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &*self;
        let mut out = lock(&this.out);
        let len = bufs.iter().map(|b| b.len()).sum();
        let append = |bytes: &mut Vec<u8>| bufs.iter().for_each(|b| bytes.extend_from_slice(b));
        if this.queue(&mut out, cx, len, append) {
            return Poll::Ready(Ok(len));
        }
        out.poll_write_now(cx, |stream, cx| stream.poll_write_vectored(cx, bufs))
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
        let (accepted, connected) = sockets().await;
        (sends.client(accepted), connected)
    }

    /// The two ends of a loopback connection.
    async fn sockets() -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let connecting = TcpStream::connect(listener.local_addr().unwrap());
        let (accepted, connected) = tokio::join!(listener.accept(), connecting);
        (accepted.unwrap().0, connected.unwrap())
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

    fn pattern(at: u64) -> u8 {
        (at % 251) as u8
    }

    /// Small writes of a known pattern, each turn's sent by the sending task, until the socket
    /// is full and a write has to wait for room; the bytes accepted.
    async fn fill(a: &mut Stream) -> u64 {
        let mut written: u64 = 0;
        loop {
            let chunk: Vec<u8> = (0..1000).map(|i| pattern(written + i)).collect();
            let polled =
                std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut *a).poll_write(cx, &chunk)))
                    .await;
            match polled {
                Poll::Ready(n) => written += n.unwrap() as u64,
                Poll::Pending => return written,
            }
            tokio::task::yield_now().await;
            assert!(written < 1 << 30, "the writer was never held back");
        }
    }

    #[tokio::test]
    async fn small_writes_wait_for_the_turn_and_keep_their_order_with_large_ones() {
        let sends = Sends::start(Duration::from_secs(5));
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
    async fn bytes_queued_when_a_connection_is_dropped_go_to_a_client_not_to_a_front_end() {
        let sends = Sends::start(Duration::from_secs(5));
        let (socket_a, peer_a) = sockets().await;
        let (socket_b, peer_b) = sockets().await;
        let (mut client, mut front_end) = (sends.client(socket_a), sends.front_end(socket_b));
        client.write_all(b"last words").await.unwrap();
        front_end.write_all(b"a request given up").await.unwrap();
        drop((client, front_end));
        assert_eq!(read_to_end(peer_a).await, b"last words");
        assert_eq!(read_to_end(peer_b).await, b"");
    }

    #[tokio::test]
    async fn a_withdrawn_write_never_goes_out_and_one_the_socket_took_cannot_be_withdrawn() {
        let sends = Sends::start(Duration::from_secs(5));
        let (socket, mut peer) = sockets().await;
        let mut a = sends.front_end(socket);
        let at = a.end();
        a.write_all(b"given up").await.unwrap();
        assert!(a.withdraw(at));
        // The loop's turn passes with the connection still queued.
        tokio::task::yield_now().await;
        let at = a.end();
        a.write_all(b"sent").await.unwrap();
        let mut got = [0u8; 4];
        peer.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"sent");
        assert!(!a.withdraw(at));
        drop(a);
        assert_eq!(read_to_end(peer).await, b"");
    }

    #[tokio::test]
    async fn a_connection_whose_bytes_all_went_out_keeps_no_waker() {
        struct Task;
        impl std::task::Wake for Task {
            fn wake(self: Arc<Self>) {}
        }
        let sends = Sends::start(Duration::from_secs(5));
        let (mut a, mut peer) = pair(&sends).await;
        let task = Arc::new(Task);
        let waker = Waker::from(task.clone());
        let polled = Pin::new(&mut a).poll_write(&mut Context::from_waker(&waker), b"answer");
        assert!(matches!(polled, Poll::Ready(Ok(6))));
        drop(waker);
        assert_eq!(
            Arc::strong_count(&task),
            2,
            "the queued connection keeps its waker"
        );
        let mut got = [0u8; 6];
        peer.read_exact(&mut got).await.unwrap();
        // A pooled connection would otherwise hold a finished task's memory.
        assert_eq!(Arc::strong_count(&task), 1);
    }

    #[tokio::test]
    async fn a_connection_with_bytes_waiting_is_not_open() {
        let sends = Sends::start(Duration::from_secs(5));
        let (socket, _peer) = sockets().await;
        let mut a = sends.front_end(socket);
        assert!(a.is_open());
        // The peer takes nothing: what the socket cannot take waits.
        fill(&mut a).await;
        assert!(
            !a.is_open(),
            "a request would be queued behind another's tail"
        );
    }

    #[tokio::test]
    async fn a_client_that_reads_nothing_holds_the_writer_back_and_loses_nothing() {
        let sends = Sends::start(Duration::from_secs(5));
        let (mut a, peer) = pair(&sends).await;
        let written = fill(&mut a).await;
        assert!(lock(&a.out).bytes.len() <= QUEUED_MOST);
        let reading = tokio::spawn(read_to_end(peer));
        let rest: Vec<u8> = (0..1000).map(|i| pattern(written + i)).collect();
        a.write_all(&rest).await.unwrap();
        a.shutdown().await.unwrap();
        let got = reading.await.unwrap();
        assert_eq!(got.len() as u64, written + rest.len() as u64);
        assert!(got.iter().enumerate().all(|(i, b)| *b == pattern(i as u64)));
    }

    #[tokio::test]
    async fn what_a_dropped_connection_could_not_send_goes_out_as_the_client_reads() {
        let sends = Sends::start(Duration::from_secs(5));
        let (mut a, peer) = pair(&sends).await;
        let progress = a.progress();
        let written = fill(&mut a).await;
        assert!(
            !lock(&a.out).bytes.is_empty(),
            "nothing was left to the connection"
        );
        assert!(progress.load(Ordering::Relaxed) < written);
        // hyper took the queued flush as done and drops the connection (a header timeout).
        drop(a);
        let got = read_to_end(peer).await;
        assert_eq!(got.len() as u64, written);
        assert!(got.iter().enumerate().all(|(i, b)| *b == pattern(i as u64)));
        assert_eq!(progress.load(Ordering::Relaxed), written);
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_cut_off_for_taking_nothing_is_not_given_the_send_timeout_again() {
        let timeout = Duration::from_secs(60);
        let sends = Sends::start(timeout);
        let (mut a, _peer) = pair(&sends).await;
        fill(&mut a).await;
        // The guard's send timeout runs out: the client took nothing since the write waited.
        tokio::time::advance(timeout).await;
        let started = tokio::time::Instant::now();
        let lingering = sends.linger(a.out.clone()).unwrap();
        lingering.await.unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "lingered {:?}",
            started.elapsed()
        );
        assert!(!lock(&a.out).bytes.is_empty());
    }

    #[tokio::test]
    async fn a_queued_write_that_fails_fails_the_next_write() {
        let sends = Sends::start(Duration::from_secs(5));
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
