//! The access log (`--access-log FILE`, or `-` for standard output): one JSON line per request
//! answered on the client port, whoever answered it, written when its response has ended.
//!
//! The request path never waits for the disk. Each event loop appends its lines to a buffer of
//! its own (a lock no other loop takes); a writer thread takes the buffers' contents every
//! [`FLUSH_EVERY`], or sooner when one holds [`FLUSH_AT`] bytes, and writes each buffer whole
//! (`O_APPEND`; one `write` unless the disk takes less, so lines of several loops do not
//! interleave). Lines reach the file in the order of each loop's answers, loop after loop.
//! When the writer falls behind (a full or slow disk) and a loop's buffer reaches
//! [`MAX_BUFFERED`], that loop's next lines are dropped and counted
//! (`paddock_balancer_access_log_lost_lines_total`), and the writer says how many in the log.
//! [`AccessLog::reopen`] (SIGHUP) opens the file again by its path: what log rotation needs
//! after it renamed it. [`AccessLog::flush`] and `reopen` wait for the writer at most
//! [`WAIT_FOR_WRITER`]: a writer stuck on a hung disk never holds a stop or a restart.

use std::fs::File;
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context as _;
use prometheus_client::metrics::counter::Counter;
use serde::Serialize;

/// Longest a line waits in a loop's buffer.
pub const FLUSH_EVERY: Duration = Duration::from_millis(500);
/// A buffer this full wakes the writer.
const FLUSH_AT: usize = 32 * 1024;
/// A loop's buffer this full (the writer is behind) takes no more lines.
const MAX_BUFFERED: usize = 4 * 1024 * 1024;
/// Longest [`AccessLog::flush`] and [`AccessLog::reopen`] wait for the writer.
pub const WAIT_FOR_WRITER: Duration = Duration::from_secs(5);

/// Where the lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    File(PathBuf),
    Stdout,
}

impl std::fmt::Display for Destination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Destination::File(path) => write!(f, "{}", path.display()),
            Destination::Stdout => f.write_str("standard output"),
        }
    }
}

/// One request as the access log tells it.
#[derive(Debug, Serialize)]
pub struct Entry<'a> {
    /// When the request's head had arrived (RFC 3339, UTC, milliseconds).
    #[serde(serialize_with = "rfc3339")]
    pub time: SystemTime,
    /// The client's IP address (the balancer's peer).
    pub client: &'a str,
    pub method: &'a str,
    /// The `Host` the client named (empty without one).
    pub host: &'a str,
    /// Path and query, as the client sent them.
    pub target: &'a str,
    /// `HTTP/1.1`, `HTTP/2.0` or `HTTP/1.0`, as the client spoke.
    pub protocol: &'a str,
    pub status: u16,
    /// Response body bytes handed to the client.
    pub bytes: u64,
    /// From the request's head to the end of its response, in milliseconds.
    pub ms: f64,
    /// The app routed at the path (none when the balancer answered before routing).
    pub app: Option<&'a str>,
    /// The version that answered, as the front-end named it.
    pub version: Option<&'a str>,
    /// The front-end that answered (none: the balancer answered itself).
    pub server: Option<&'a str>,
    /// Front-ends tried for this answer (0: the balancer answered itself).
    pub tries: u32,
    /// The request's id, as the front-ends were given it (none: refused before it was
    /// forwarded).
    pub request_id: Option<&'a str>,
    /// Whether the whole response was handed to the client's connection (no: the client went
    /// away, or the front-end's answer broke off).
    pub complete: bool,
    /// Why the balancer answered itself (404, 502, 503 …), as the response body says.
    pub error: Option<&'a str>,
}

fn rfc3339<S: serde::Serializer>(time: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_rfc3339_millis(*time))
}

/// Milliseconds, to the microsecond.
pub fn millis(elapsed: Duration) -> f64 {
    elapsed.as_micros() as f64 / 1000.0
}

/// When something that took `elapsed` until now began.
pub fn began(elapsed: Duration) -> SystemTime {
    SystemTime::now()
        .checked_sub(elapsed)
        .unwrap_or(SystemTime::UNIX_EPOCH)
}

/// The access log of a balancer; cloned handles share it. Lines recorded before the last
/// handle is dropped are written.
#[derive(Clone)]
pub struct AccessLog {
    shared: Arc<Shared>,
    orders: SyncSender<Order>,
}

impl std::fmt::Debug for AccessLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessLog")
            .field("destination", &self.shared.destination)
            .finish_non_exhaustive()
    }
}

struct Shared {
    destination: Destination,
    /// One per event loop.
    buffers: Box<[Mutex<Buffer>]>,
    /// Lines dropped or not written, since the start.
    lost: Counter,
}

#[derive(Default)]
struct Buffer {
    bytes: Vec<u8>,
    lines: u64,
    /// Lines refused since the writer last took this buffer.
    dropped: u64,
    /// The writer was woken for this buffer and has not taken it yet.
    woken: bool,
}

enum Order {
    /// A buffer is full enough to write.
    Wake,
    /// Write what the buffers hold, then answer.
    Flush(SyncSender<()>),
    /// Write what the buffers hold to the file open now, then open the file again by its path.
    Reopen(SyncSender<anyhow::Result<()>>),
}

impl AccessLog {
    /// Opens `destination` (creating the file, appending to it) and starts the writer thread;
    /// `loops` is the number of event loops that record.
    pub fn open(destination: Destination, loops: usize) -> anyhow::Result<AccessLog> {
        let out = Out::open(&destination)?;
        let shared = Arc::new(Shared {
            destination,
            buffers: (0..loops.max(1)).map(|_| Mutex::default()).collect(),
            lost: Counter::default(),
        });
        let (orders, received) = std::sync::mpsc::sync_channel(16);
        let writer = Writer {
            shared: shared.clone(),
            out,
            spare: Vec::new(),
            lost: 0,
            failing: None,
        };
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || writer.run(received))
            .context("starting the access log's writer thread")?;
        Ok(AccessLog { shared, orders })
    }

    pub fn destination(&self) -> &Destination {
        &self.shared.destination
    }

    /// The count of lines dropped (the writer behind) or not written (a write failed).
    pub fn lost(&self) -> Counter {
        self.shared.lost.clone()
    }

    /// Adds a line for `entry` to the current event loop's buffer.
    pub fn record(&self, entry: &Entry<'_>) {
        let index = crate::upstream::worker() % self.shared.buffers.len();
        let mut buffer = lock(&self.shared.buffers[index]);
        if buffer.bytes.len() >= MAX_BUFFERED {
            buffer.dropped += 1;
            return;
        }
        if serde_json::to_writer(&mut buffer.bytes, entry).is_err() {
            // Writing into a `Vec` fails only on a value JSON cannot hold; nothing of it stays.
            buffer.dropped += 1;
            return;
        }
        buffer.bytes.push(b'\n');
        buffer.lines += 1;
        if buffer.bytes.len() >= FLUSH_AT && !buffer.woken {
            buffer.woken = true;
            drop(buffer);
            // Full means the writer has orders to read already, and reads every buffer then.
            let _ = self.orders.try_send(Order::Wake);
        }
    }

    /// Writes every line recorded so far; returns once they are written (or were lost), or
    /// after [`WAIT_FOR_WRITER`] with an error when the writer is stuck.
    pub fn flush(&self) -> anyhow::Result<()> {
        let (done, wait) = std::sync::mpsc::sync_channel(1);
        self.order(Order::Flush(done), &wait)
    }

    /// Writes every line recorded so far, then opens the file again by its path (log rotation
    /// renamed it): later lines go to the file now there. When it cannot be opened, lines go
    /// on to the file open before, and the error says why.
    pub fn reopen(&self) -> anyhow::Result<()> {
        let (done, wait) = std::sync::mpsc::sync_channel(1);
        self.order(Order::Reopen(done), &wait)?
    }

    /// Gives the writer `order` and waits for its answer on `wait`, at most
    /// [`WAIT_FOR_WRITER`] in all.
    fn order<T>(&self, order: Order, wait: &Receiver<T>) -> anyhow::Result<T> {
        let deadline = Instant::now() + WAIT_FOR_WRITER;
        let stuck = || {
            anyhow::anyhow!(
                "the access log's writer has not written to {} for {WAIT_FOR_WRITER:?}: the disk (or the reader of standard output) does not take the lines; lines not written yet may be lost",
                self.shared.destination
            )
        };
        let mut order = Some(order);
        while let Some(o) = order.take() {
            match self.orders.try_send(o) {
                Ok(()) => {}
                Err(std::sync::mpsc::TrySendError::Full(o)) => {
                    if Instant::now() >= deadline {
                        return Err(stuck());
                    }
                    order = Some(o);
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(std::sync::mpsc::TrySendError::Disconnected(_)) => {
                    anyhow::bail!("the access log's writer has stopped")
                }
            }
        }
        wait.recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .map_err(|_| stuck())
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

enum Out {
    File(File),
    Stdout,
}

impl Out {
    fn open(destination: &Destination) -> anyhow::Result<Out> {
        match destination {
            Destination::Stdout => Ok(Out::Stdout),
            Destination::File(path) => std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map(Out::File)
                .with_context(|| {
                    format!(
                        "cannot open the access log {}: give a file in a folder that exists and this user may write",
                        path.display()
                    )
                }),
        }
    }

    fn write_all(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match self {
            Out::File(file) => file.write_all(bytes),
            Out::Stdout => {
                let mut stdout = std::io::stdout().lock();
                stdout.write_all(bytes)?;
                stdout.flush()
            }
        }
    }
}

struct Writer {
    shared: Arc<Shared>,
    out: Out,
    /// The buffer swapped into a loop's place each time its lines are taken.
    spare: Vec<u8>,
    /// Lines dropped or not written since the last time the log said so.
    lost: u64,
    /// Since when writing fails, and why.
    failing: Option<(Instant, String)>,
}

impl Writer {
    fn run(mut self, orders: Receiver<Order>) {
        loop {
            match orders.recv_timeout(FLUSH_EVERY) {
                Ok(Order::Wake) | Err(RecvTimeoutError::Timeout) => self.write_buffers(),
                Ok(Order::Flush(done)) => {
                    self.write_buffers();
                    let _ = done.send(());
                }
                Ok(Order::Reopen(done)) => {
                    self.write_buffers();
                    let opened = match &self.shared.destination {
                        // Nothing to open again.
                        Destination::Stdout => Ok(()),
                        destination => Out::open(destination).map(|out| {
                            self.out = out;
                            tracing::info!("access log {destination} opened again");
                        }),
                    };
                    if let Err(e) = &opened {
                        tracing::error!("{e:#}; writing on to the file open before");
                    }
                    let _ = done.send(opened);
                }
                Err(RecvTimeoutError::Disconnected) => {
                    self.write_buffers();
                    return;
                }
            }
        }
    }

    /// Takes each loop's lines and writes them.
    fn write_buffers(&mut self) {
        for index in 0..self.shared.buffers.len() {
            let (lines, dropped) = {
                let mut buffer = lock(&self.shared.buffers[index]);
                std::mem::swap(&mut buffer.bytes, &mut self.spare);
                buffer.woken = false;
                (
                    std::mem::take(&mut buffer.lines),
                    std::mem::take(&mut buffer.dropped),
                )
            };
            self.lost += dropped;
            self.shared.lost.inc_by(dropped);
            if self.spare.is_empty() {
                continue;
            }
            let written = self.out.write_all(&self.spare);
            self.spare.clear();
            match written {
                Ok(()) => {
                    if let Some((since, why)) = self.failing.take() {
                        tracing::warn!(
                            "access log {}: writing again after {:.0?} of failures ({why})",
                            self.shared.destination,
                            since.elapsed()
                        );
                    }
                }
                Err(e) => {
                    self.lost += lines;
                    self.shared.lost.inc_by(lines);
                    if self.failing.is_none() {
                        tracing::error!(
                            "cannot write the access log {}: {e}; its lines are lost until it can (requests are served as before). Free space on its disk or mend the file's permissions: writing resumes by itself, and paddock_balancer_access_log_lost_lines_total counts what was lost",
                            self.shared.destination
                        );
                        self.failing = Some((Instant::now(), e.to_string()));
                    }
                }
            }
        }
        if self.lost > 0 && self.failing.is_none() {
            tracing::warn!(
                lost = self.lost,
                "access log {}: {} lines were not written: the disk did not keep up, or writing failed (paddock_balancer_access_log_lost_lines_total counts them)",
                self.shared.destination,
                self.lost
            );
            self.lost = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(target: &str) -> Entry<'_> {
        Entry {
            time: SystemTime::UNIX_EPOCH + Duration::from_millis(1_764_570_062_123),
            client: "10.0.0.7",
            method: "GET",
            host: "shop.example",
            target,
            protocol: "HTTP/1.1",
            status: 200,
            bytes: 12,
            ms: millis(Duration::from_micros(1_234)),
            app: Some("shop"),
            version: Some("3"),
            server: Some("fe-1"),
            tries: 1,
            request_id: Some("lb1-19ad8f3c2a1-2a"),
            complete: true,
            error: None,
        }
    }

    #[test]
    fn lines_are_json_and_written_by_a_flush_a_reopen_and_the_last_handle() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        let log = AccessLog::open(Destination::File(path.clone()), 2).unwrap();
        log.record(&entry("/shop/cart?item=\"1\""));
        log.flush().unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            text,
            concat!(
                r#"{"time":"2025-12-01T06:21:02.123Z","client":"10.0.0.7","method":"GET","host":"shop.example","#,
                r#""target":"/shop/cart?item=\"1\"","protocol":"HTTP/1.1","status":200,"bytes":12,"ms":1.234,"app":"shop","#,
                r#""version":"3","server":"fe-1","tries":1,"request_id":"lb1-19ad8f3c2a1-2a","complete":true,"#,
                r#""error":null}"#,
                "\n"
            )
        );

        // Rotated: renamed, then reopened; the next lines go to a new file by the same path.
        log.record(&entry("/before"));
        std::fs::rename(&path, dir.path().join("access.log.1")).unwrap();
        log.reopen().unwrap();
        log.record(&entry("/after"));
        drop(log);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !std::fs::read_to_string(&path).is_ok_and(|t| t.contains("/after")) {
            assert!(Instant::now() < deadline, "the last lines were not written");
            std::thread::sleep(Duration::from_millis(10));
        }
        let rotated = std::fs::read_to_string(dir.path().join("access.log.1")).unwrap();
        assert_eq!(rotated.lines().count(), 2, "{rotated}");
        assert!(rotated.contains("/before"), "{rotated}");
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 1);
    }

    #[test]
    fn lines_that_cannot_be_written_are_counted_as_lost() {
        // Every write to it fails: no space left on the device.
        let log = AccessLog::open(Destination::File("/dev/full".into()), 1).unwrap();
        log.record(&entry("/a"));
        log.record(&entry("/b"));
        log.flush().unwrap();
        assert_eq!(log.lost().get(), 2);
    }

    #[test]
    fn a_file_that_cannot_be_opened_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("no-such-folder").join("access.log");
        let e = AccessLog::open(Destination::File(path), 1).unwrap_err();
        assert!(
            format!("{e:#}").contains("no-such-folder/access.log"),
            "{e:#}"
        );
    }
}
