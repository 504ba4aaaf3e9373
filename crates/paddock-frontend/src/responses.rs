//! The front-end's response cache: responses an app marks cacheable, kept in memory and sent
//! again without running the app, until they expire or a purge drops them.
//!
//! What is kept (the explicit part of RFC 9111's rules for a shared cache):
//! - the answer to a `GET` without `Authorization`, without a body and without the app's
//!   session cookie (the server asks [`Key::of`] only then); a `HEAD` is answered from it;
//! - with status 200, 203, 204, 300, 301, 308, 404, 405, 410, 414 or 501, no `Set-Cookie` (the
//!   app's or its session's), `Cache-Control` with `s-maxage` or `max-age` above 0 and without
//!   `no-store`, `no-cache` or `private`, and no `Vary: *`;
//! - a whole body of at most a sixteenth of the cache, without trailers.
//!
//! An entry is keyed by the loaded app version (its serial: a new version or `[config]` never
//! meets the old one's responses), the `Host` and the path with its query. One variant per key:
//! the request headers the response's `Vary` names must be those it was made for, or it is a
//! miss (and the new answer replaces it). The least recently used entries go first when the
//! cache is full.
//!
//! An app tags a response with `paddock-cache-tag: a, b` and purges with
//! `paddock-cache-purge: a, b` (or `*`) on any answer; neither header reaches the client. A purge
//! drops the app's entries here at once and goes to the farm's purge log, which every front-end
//! follows ([`ResponseCache::follow`]).
//!
//! Invariants:
//! - A response is not kept if a purge that names it (its app, or one of its tags) came after
//!   its request began: the request's [`Ticket`] is older than the purge. Nor is one whose
//!   request began more than [`TICKET_LIFE`] ago (purges of tags are remembered that long).
//! - A cache that has not read the purge log for [`BLIND_AFTER`] serves nothing and keeps nothing
//!   (it may have missed purges), and starts empty when it reads the log again.

use std::collections::{HashMap, HashSet};
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use hashlink::LinkedHashMap;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body::{Body as _, Frame, SizeHint};
use http_body_util::BodyExt as _;
use paddock_api::{CachePurge, CacheReport};
use paddock_core::cache::{ADMIN_SOURCE, STATUS_HEADER};

use crate::server::Body;

/// How long the purge log may stay unread before the cache stops serving.
pub const BLIND_AFTER: Duration = Duration::from_secs(5);

/// How long the purge of a tag is remembered for the requests running then; a response whose
/// request began earlier is not kept.
pub const TICKET_LIFE: Duration = Duration::from_secs(600);

/// The statuses a response may be kept with (those RFC 9111 lets a cache keep by default).
const KEPT_STATUSES: [u16; 11] = [200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501];

/// Response headers not kept with an entry: the connection's own, and those the front-end
/// writes on each answer.
const NOT_KEPT: [&str; 11] = [
    "connection",
    "keep-alive",
    "transfer-encoding",
    "content-length",
    "age",
    "x-paddock-server",
    "x-paddock-app",
    "x-paddock-version",
    STATUS_HEADER,
    "upgrade",
    // Each answer says its own request's.
    paddock_core::request_id::HEADER,
];

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key {
    /// [`paddock_runtime::AppVersion::serial`].
    version: u64,
    host: Box<str>,
    target: Box<str>,
}

impl Key {
    /// The key of a request to the app version with this serial, if the cache may answer it:
    /// a `GET`, or a `HEAD` (answered from a `GET`'s entry; its own answers are not kept).
    pub fn of<B>(version: u64, req: &Request<B>) -> Option<Key> {
        if (req.method() != Method::GET && req.method() != Method::HEAD)
            || req.headers().contains_key(header::AUTHORIZATION)
            || has_body(req.headers())
        {
            return None;
        }
        // No entry for a request whose host cannot be read: it would share one with others.
        let host = match req.headers().get(header::HOST) {
            Some(host) => host.to_str().ok()?,
            None => req.uri().authority()?.as_str(),
        };
        let target = req.uri().path_and_query().map_or("/", |p| p.as_str());
        Some(Key {
            version,
            host: host.to_ascii_lowercase().into(),
            target: target.into(),
        })
    }
}

fn has_body(headers: &HeaderMap) -> bool {
    headers.contains_key(header::TRANSFER_ENCODING)
        || headers
            .get(header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() != b"0")
}

/// A kept response.
pub struct Entry {
    app: Arc<str>,
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
    stored: Instant,
    ttl: Duration,
    /// The request headers `Vary` names, with every value the request that made it had.
    vary: Vary,
    tags: Vec<Box<str>>,
    weight: usize,
}

/// Request headers a response varies on, each with its values in order.
type Vary = Vec<(HeaderName, Vec<HeaderValue>)>;

impl Entry {
    fn fresh(&self, now: Instant) -> bool {
        now.duration_since(self.stored) < self.ttl
    }

    fn fits(&self, request: &HeaderMap) -> bool {
        self.vary
            .iter()
            .all(|(name, values)| request.get_all(name).iter().eq(values.iter()))
    }

    /// The answer from this entry: its status, headers and body, its age, and `hit`.
    pub fn response(&self) -> Response<Body> {
        let mut response = Response::new(
            http_body_util::Full::new(self.body.clone())
                .map_err(|never| match never {})
                .boxed_unsync(),
        );
        *response.status_mut() = self.status;
        let headers = response.headers_mut();
        headers.clone_from(&self.headers);
        headers.insert(
            header::AGE,
            HeaderValue::from(self.stored.elapsed().as_secs()),
        );
        headers.insert(STATUS_HEADER, HeaderValue::from_static("hit"));
        response
    }
}

/// When a request to be kept began, in purges: a purge after it means its answer may be stale.
#[derive(Debug, Clone, Copy)]
pub struct Ticket {
    purges: u64,
    at: Instant,
}

/// What [`ResponseCache::lookup`] found.
pub enum Lookup {
    Hit(Arc<Entry>),
    /// Not there: the answer may be kept, with this ticket.
    Miss(Ticket),
    /// The cache serves nothing now.
    Off,
}

/// How a response may be kept: for how long, with which tags, varying on which headers.
#[derive(Debug, PartialEq, Eq)]
pub struct Keep {
    ttl: Duration,
    vary: Vec<HeaderName>,
}

/// Whether a response may be kept, by its status and headers (see the module's rules).
pub fn keep(status: StatusCode, headers: &HeaderMap) -> Option<Keep> {
    if !KEPT_STATUSES.contains(&status.as_u16()) || headers.contains_key(header::SET_COOKIE) {
        return None;
    }
    let mut max_age = None;
    let mut s_maxage = None;
    for value in headers.get_all(header::CACHE_CONTROL) {
        let value = value.to_str().ok()?;
        for directive in value.split(',') {
            let (name, argument) = match directive.split_once('=') {
                Some((name, argument)) => (name.trim(), Some(argument.trim().trim_matches('"'))),
                None => (directive.trim(), None),
            };
            let seconds = || argument.and_then(|a| a.parse::<u64>().ok());
            match name.to_ascii_lowercase().as_str() {
                "no-store" | "no-cache" | "private" => return None,
                "max-age" => max_age = seconds(),
                "s-maxage" => s_maxage = seconds(),
                _ => {}
            }
        }
    }
    let seconds = s_maxage.or(max_age).filter(|s| *s > 0)?;
    let mut vary = Vec::new();
    for value in headers.get_all(header::VARY) {
        for name in value.to_str().ok()?.split(',').map(str::trim) {
            if name == "*" {
                return None;
            }
            if !name.is_empty() {
                vary.push(HeaderName::from_bytes(name.as_bytes()).ok()?);
            }
        }
    }
    Some(Keep {
        ttl: Duration::from_secs(seconds.min(365 * 86_400)),
        vary,
    })
}

/// An app and one of its tags.
type AppTag = (Arc<str>, Box<str>);

struct Inner {
    /// Least recently used first.
    entries: LinkedHashMap<Arc<Key>, Arc<Entry>>,
    bytes: usize,
    /// The keys of each app's entries with a tag.
    tagged: HashMap<AppTag, HashSet<Arc<Key>>>,
    /// Counts purges; a ticket is its value when the request began.
    purges: u64,
    /// The value of `purges` after each app's last purge of all its responses.
    purged: HashMap<Arc<str>, u64>,
    /// The value of `purges` after the last purge of each tag, and when (forgotten after
    /// [`TICKET_LIFE`]).
    purged_tags: HashMap<AppTag, (u64, Instant)>,
    /// How many `purged_tags` may hold before the forgotten ones are taken out.
    purged_tags_limit: usize,
    /// The value of `purges` after the last time everything went.
    cleared: u64,
    /// Why the cache serves nothing now, if it does not.
    off: Option<String>,
}

impl Inner {
    fn remove(&mut self, key: &Key) {
        if let Some(entry) = self.entries.remove(key) {
            self.forget(key, &entry);
        }
    }

    fn forget(&mut self, key: &Key, entry: &Entry) {
        self.bytes -= entry.weight;
        for tag in &entry.tags {
            let index = (entry.app.clone(), tag.clone());
            if let Some(keys) = self.tagged.get_mut(&index) {
                keys.remove(key);
                if keys.is_empty() {
                    self.tagged.remove(&index);
                }
            }
        }
    }

    fn clear(&mut self) {
        self.entries.clear();
        self.tagged.clear();
        self.bytes = 0;
        self.purges += 1;
        self.cleared = self.purges;
    }
}

pub struct ResponseCache {
    max_bytes: usize,
    inner: Mutex<Inner>,
    hits: AtomicU64,
    misses: AtomicU64,
    /// The last purge of the farm's log applied.
    log_position: AtomicI64,
    /// Purges this server wrote to the log after applying them: skipped when read there, so
    /// that what was kept since is not dropped again.
    written: Mutex<HashSet<i64>>,
    /// Whether purges come from the farm's log ([`ResponseCache::following`]).
    follows: bool,
    born: Instant,
    /// When the log was last read, in milliseconds since `born`.
    last_read_ms: AtomicU64,
}

impl ResponseCache {
    /// A cache purged only by this server's apps.
    pub fn new(max_bytes: usize) -> ResponseCache {
        ResponseCache::with(max_bytes, false)
    }

    /// A cache that also follows the farm's purge log ([`ResponseCache::follow`]): off until
    /// the log has been read, and whenever it has not been for [`BLIND_AFTER`].
    pub fn following(max_bytes: usize) -> ResponseCache {
        let cache = ResponseCache::with(max_bytes, true);
        cache.set_off(Some("reading the farm's purge log".to_string()));
        cache
    }

    fn with(max_bytes: usize, follows: bool) -> ResponseCache {
        ResponseCache {
            max_bytes,
            inner: Mutex::new(Inner {
                entries: LinkedHashMap::new(),
                bytes: 0,
                tagged: HashMap::new(),
                purges: 0,
                purged: HashMap::new(),
                purged_tags: HashMap::new(),
                purged_tags_limit: 4096,
                cleared: 0,
                off: None,
            }),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            log_position: AtomicI64::new(0),
            written: Mutex::new(HashSet::new()),
            follows,
            born: Instant::now(),
            last_read_ms: AtomicU64::new(0),
        }
    }

    /// Whether the log this cache follows has gone unread for [`BLIND_AFTER`]: a read that
    /// hangs makes the cache serve nothing as surely as one that fails.
    fn unread(&self) -> bool {
        if !self.follows {
            return false;
        }
        let since_born = self.born.elapsed().as_millis() as u64;
        since_born.saturating_sub(self.last_read_ms.load(Ordering::Acquire))
            > BLIND_AFTER.as_millis() as u64
    }

    /// Notes purges this server applied and then wrote to the farm's log.
    pub fn written(&self, ids: &[i64]) {
        let position = self.log_position.load(Ordering::Acquire);
        let mut written = self.written.lock().unwrap_or_else(|e| e.into_inner());
        if written.len() > 10_000 {
            // Never read back (the log was not read for long): forget them.
            written.clear();
        }
        written.extend(ids.iter().filter(|id| **id > position));
    }

    /// Whether the log's purge `id` is one this server wrote (and applied) itself.
    fn wrote(&self, id: i64) -> bool {
        self.written
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id)
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The largest body kept.
    fn max_body(&self) -> usize {
        self.max_bytes / 16
    }

    pub fn lookup(&self, key: &Key, request: &HeaderMap) -> Lookup {
        let mut inner = self.inner();
        if inner.off.is_some() || self.unread() {
            return Lookup::Off;
        }
        let now = Instant::now();
        let found = inner.entries.to_back(key).map(|entry| entry.clone());
        match found {
            Some(entry) if entry.fresh(now) && entry.fits(request) => {
                self.hits.fetch_add(1, Ordering::Relaxed);
                Lookup::Hit(entry)
            }
            found => {
                if found.is_some_and(|entry| !entry.fresh(now)) {
                    inner.remove(key);
                }
                Lookup::Miss(Ticket {
                    purges: inner.purges,
                    at: now,
                })
            }
        }
    }

    /// Keeps an answer with its whole body, unless a purge that names it came after its
    /// request began, the cache is off, or it is larger than a sixteenth of the cache.
    fn insert(&self, answer: Answer, body: Bytes) -> bool {
        let Answer {
            ticket,
            key,
            app,
            status,
            headers,
            ttl,
            vary,
            tags,
        } = answer;
        let weight = body.len()
            + key.host.len()
            + key.target.len()
            + headers
                .iter()
                .map(|(n, v)| n.as_str().len() + v.len())
                .sum::<usize>()
            + 256;
        if weight > self.max_body() + 64 * 1024 {
            return false;
        }
        let mut inner = self.inner();
        let purged = inner
            .purged
            .get(&app)
            .copied()
            .unwrap_or(0)
            .max(inner.cleared);
        let tag_purged = tags.iter().any(|tag| {
            inner
                .purged_tags
                .get(&(app.clone(), tag.clone()))
                .is_some_and(|(purge, _)| ticket.purges < *purge)
        });
        if inner.off.is_some()
            || self.unread()
            || ticket.purges < purged
            || tag_purged
            || ticket.at.elapsed() > TICKET_LIFE
        {
            return false;
        }
        let key = Arc::new(key);
        inner.remove(&key);
        for tag in &tags {
            inner
                .tagged
                .entry((app.clone(), tag.clone()))
                .or_default()
                .insert(key.clone());
        }
        inner.bytes += weight;
        inner.entries.insert(
            key,
            Arc::new(Entry {
                app,
                status,
                headers,
                body,
                stored: Instant::now(),
                ttl,
                vary,
                tags,
                weight,
            }),
        );
        while inner.bytes > self.max_bytes {
            let Some((key, entry)) = inner.entries.pop_front() else {
                break;
            };
            inner.forget(&key, &entry);
        }
        true
    }

    /// Drops an app's entries with one of `tags`, or all of its entries when `tags` is empty.
    /// Returns how many went.
    pub fn purge(&self, app: &str, tags: &[&str]) -> usize {
        let mut inner = self.inner();
        let app: Arc<str> = Arc::from(app);
        inner.purges += 1;
        let purge = inner.purges;
        if tags.is_empty() {
            inner.purged.insert(app.clone(), purge);
        } else {
            let now = Instant::now();
            if inner.purged_tags.len() >= inner.purged_tags_limit {
                inner
                    .purged_tags
                    .retain(|_, (_, at)| now.duration_since(*at) <= TICKET_LIFE);
                // Scanned again only once it has doubled: each purge pays for a few.
                inner.purged_tags_limit = (2 * inner.purged_tags.len()).max(4096);
            }
            for tag in tags {
                inner
                    .purged_tags
                    .insert((app.clone(), Box::from(*tag)), (purge, now));
            }
        }
        let keys: Vec<Arc<Key>> = if tags.is_empty() {
            inner
                .entries
                .iter()
                .filter(|(_, entry)| entry.app == app)
                .map(|(key, _)| key.clone())
                .collect()
        } else {
            tags.iter()
                .filter_map(|tag| inner.tagged.get(&(app.clone(), Box::from(*tag))))
                .flatten()
                .cloned()
                .collect()
        };
        let before = inner.entries.len();
        for key in keys {
            inner.remove(&key);
        }
        before - inner.entries.len()
    }

    /// Stops serving from the cache, saying why; `None` serves again, from an empty cache.
    pub fn set_off(&self, why: Option<String>) {
        let mut inner = self.inner();
        if why.is_none() && inner.off.is_some() {
            inner.clear();
        }
        inner.off = why;
    }

    pub fn off(&self) -> Option<String> {
        self.inner().off.clone()
    }

    pub fn report(&self) -> CacheReport {
        let inner = self.inner();
        CacheReport {
            purged: self.log_position.load(Ordering::Acquire),
            entries: inner.entries.len() as u64,
            bytes: inner.bytes as u64,
            max_bytes: self.max_bytes as u64,
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            off: inner.off.clone(),
        }
    }

    /// Wraps the body of a response to a missed request so that, once it has been sent whole,
    /// it is kept (see [`ResponseCache::insert`]).
    #[allow(clippy::too_many_arguments)]
    pub fn record(
        self: &Arc<Self>,
        ticket: Ticket,
        key: Key,
        app: Arc<str>,
        keep: Keep,
        request: &HeaderMap,
        response: Response<Body>,
        tags: Vec<Box<str>>,
    ) -> Response<Body> {
        self.misses.fetch_add(1, Ordering::Relaxed);
        let vary = keep
            .vary
            .iter()
            .map(|name| {
                (
                    name.clone(),
                    request.get_all(name).iter().cloned().collect(),
                )
            })
            .collect();
        let (mut parts, body) = response.into_parts();
        let mut headers = parts.headers.clone();
        for name in NOT_KEPT {
            headers.remove(name);
        }
        parts
            .headers
            .insert(STATUS_HEADER, HeaderValue::from_static("miss"));
        let answer = Answer {
            ticket,
            key,
            app,
            status: parts.status,
            headers,
            ttl: keep.ttl,
            vary,
            tags,
        };
        // A body known to be empty is whole now: hyper may never poll it.
        if body.is_end_stream() {
            self.insert(answer, Bytes::new());
            return Response::from_parts(parts, body);
        }
        // hyper stops polling a body once it has sent as many bytes as it said it would, without
        // waiting for the end: such a body is kept when that many bytes have passed.
        let length = body.size_hint().exact().or_else(|| {
            parts
                .headers
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok()?.parse().ok())
        });
        Response::from_parts(
            parts,
            Recording {
                inner: body,
                buffer: BytesMut::new(),
                limit: self.max_body(),
                length,
                cache: self.clone(),
                pending: Some(answer),
            }
            .boxed_unsync(),
        )
    }

    /// Follows the farm's purge log for ever: applies each new purge, every `interval`. Until
    /// it has read the log once, and after it could not for [`BLIND_AFTER`], the cache is off.
    /// `applied` is woken after an operator's purge was applied (the heartbeat reports it).
    pub async fn follow(
        self: Arc<Self>,
        log: Arc<dyn PurgeLog>,
        interval: Duration,
        applied: Arc<tokio::sync::Notify>,
    ) {
        const BATCH: u32 = 1000;
        let mut position = None;
        loop {
            let read = async {
                match position {
                    None => log.last().await.map(|id| (id, Vec::new())),
                    Some(from) => log.after(from, BATCH).await.map(|purges| {
                        let to = purges.last().map_or(from, |p| p.id);
                        (to, purges)
                    }),
                }
            };
            let read = match tokio::time::timeout(BLIND_AFTER, read).await {
                Ok(read) => read,
                Err(_) => Err(anyhow::anyhow!(
                    "no answer within {} s",
                    BLIND_AFTER.as_secs()
                )),
            };
            let mut more = false;
            match read {
                Ok((to, purges)) => {
                    for purge in purges.iter().filter(|p| !self.wrote(p.id)) {
                        let tags: Vec<&str> = purge.tag.as_deref().into_iter().collect();
                        let gone = self.purge(&purge.app, &tags);
                        tracing::debug!(purge = purge.id, app = %purge.app, tag = ?purge.tag, gone, "cache purge applied");
                    }
                    more = purges.len() == BATCH as usize;
                    position = Some(to);
                    self.log_position.store(to, Ordering::Release);
                    self.last_read_ms
                        .store(self.born.elapsed().as_millis() as u64, Ordering::Release);
                    if self.off().is_some() {
                        self.set_off(None);
                        tracing::info!(
                            position = to,
                            "response cache on: reading the farm's purge log"
                        );
                        applied.notify_one();
                    }
                    // An operator's purge is waited for (`paddock cache purge`): report it
                    // now. Apps' purges go with the next heartbeat.
                    if purges.iter().any(|p| p.source == ADMIN_SOURCE) {
                        applied.notify_one();
                    }
                }
                Err(e) => {
                    let off = self.off();
                    if position.is_none() || self.unread() {
                        let why = format!("cannot read the farm's purge log: {e:#}");
                        if off.as_deref() != Some(why.as_str()) {
                            tracing::warn!(
                                "response cache off (nothing served from it until the purge log is read again): {e:#}"
                            );
                            self.set_off(Some(why));
                            applied.notify_one();
                        }
                    }
                }
            }
            if !more {
                tokio::time::sleep(interval).await;
            }
        }
    }
}

/// Where purges come from: the farm's purge log.
#[async_trait::async_trait]
pub trait PurgeLog: Send + Sync {
    /// The newest purge's id.
    async fn last(&self) -> anyhow::Result<i64>;
    /// The purges after `id`, oldest first.
    async fn after(&self, id: i64, limit: u32) -> anyhow::Result<Vec<CachePurge>>;
}

#[async_trait::async_trait]
impl PurgeLog for paddock_store::SqlStore {
    async fn last(&self) -> anyhow::Result<i64> {
        Ok(self.cache_purge_last().await?)
    }

    async fn after(&self, id: i64, limit: u32) -> anyhow::Result<Vec<CachePurge>> {
        Ok(self.cache_purges_after(id, limit).await?)
    }
}

/// An app's answer to a request that began at `ticket`, as it would be kept (its body aside).
struct Answer {
    ticket: Ticket,
    key: Key,
    app: Arc<str>,
    status: StatusCode,
    headers: HeaderMap,
    ttl: Duration,
    vary: Vary,
    tags: Vec<Box<str>>,
}

/// A response body passed on as it comes, and copied; kept in the cache when it ended well.
struct Recording {
    inner: Body,
    buffer: BytesMut,
    limit: usize,
    /// The body's length, when known before it is sent.
    length: Option<u64>,
    cache: Arc<ResponseCache>,
    /// `None` once it cannot be kept (too large, trailers, an error), or once kept.
    pending: Option<Answer>,
}

impl http_body::Body for Recording {
    type Data = Bytes;
    type Error = crate::server::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => match frame.data_ref() {
                Some(data) if this.pending.is_some() => {
                    if this.buffer.len() + data.len() > this.limit {
                        this.pending = None;
                        this.buffer = BytesMut::new();
                    } else {
                        this.buffer.extend_from_slice(data);
                        let whole = this.length == Some(this.buffer.len() as u64)
                            || this.inner.is_end_stream();
                        if whole && let Some(answer) = this.pending.take() {
                            this.cache
                                .insert(answer, std::mem::take(&mut this.buffer).freeze());
                        }
                    }
                }
                Some(_) => {}
                None => this.pending = None,
            },
            Poll::Ready(Some(Err(_))) => this.pending = None,
            Poll::Ready(None) => {
                if let Some(answer) = this.pending.take() {
                    this.cache
                        .insert(answer, std::mem::take(&mut this.buffer).freeze());
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        // The end must be polled for, so that the body is kept.
        self.pending.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        map
    }

    fn ok_keep(pairs: &[(&str, &str)]) -> Option<Keep> {
        keep(StatusCode::OK, &headers(pairs))
    }

    #[test]
    fn only_explicitly_cacheable_answers_are_kept() {
        let kept = ok_keep(&[("cache-control", "public, max-age=60")]).unwrap();
        assert_eq!(kept.ttl, Duration::from_secs(60));
        // s-maxage is the shared caches' own.
        let kept = ok_keep(&[("cache-control", "max-age=5, s-maxage=30")]).unwrap();
        assert_eq!(kept.ttl, Duration::from_secs(30));
        assert_eq!(ok_keep(&[]), None);
        assert_eq!(ok_keep(&[("cache-control", "max-age=0")]), None);
        assert_eq!(ok_keep(&[("cache-control", "max-age=60, private")]), None);
        assert_eq!(ok_keep(&[("cache-control", "no-store, max-age=60")]), None);
        assert_eq!(
            ok_keep(&[
                ("cache-control", "max-age=60"),
                ("cache-control", "no-cache")
            ]),
            None
        );
        assert_eq!(
            ok_keep(&[("cache-control", "max-age=60"), ("set-cookie", "a=b")]),
            None
        );
        assert_eq!(
            ok_keep(&[("cache-control", "max-age=60"), ("vary", "*")]),
            None
        );
        assert_eq!(ok_keep(&[("cache-control", "max-age=x")]), None);
        assert_eq!(
            keep(
                StatusCode::INTERNAL_SERVER_ERROR,
                &headers(&[("cache-control", "max-age=60")])
            ),
            None
        );
        assert!(
            keep(
                StatusCode::NOT_FOUND,
                &headers(&[("cache-control", "max-age=60")])
            )
            .is_some()
        );
        let kept = ok_keep(&[
            ("cache-control", "max-age=60"),
            ("vary", "Accept-Language, accept"),
        ])
        .unwrap();
        assert_eq!(kept.vary, vec![header::ACCEPT_LANGUAGE, header::ACCEPT]);
    }

    #[test]
    fn only_plain_gets_are_looked_up() {
        let get = |pairs: &[(&str, &str)]| {
            let mut req = Request::get("/app/x?y=1").body(()).unwrap();
            *req.headers_mut() = headers(pairs);
            Key::of(7, &req)
        };
        let key = get(&[("host", "Shop.Example")]).unwrap();
        assert_eq!(&*key.host, "shop.example");
        assert_eq!(&*key.target, "/app/x?y=1");
        assert_eq!(get(&[("host", "h"), ("authorization", "Bearer x")]), None);
        assert_eq!(get(&[("host", "h"), ("content-length", "3")]), None);
        assert!(get(&[("host", "h"), ("content-length", "0")]).is_some());
        // A host that cannot be read would share its entries with others.
        assert_eq!(get(&[]), None);
        let mut odd = Request::get("/app/x").body(()).unwrap();
        odd.headers_mut()
            .insert(header::HOST, HeaderValue::from_bytes(b"caf\xe9").unwrap());
        assert_eq!(Key::of(7, &odd), None);
        let post = Request::post("/app/x").body(()).unwrap();
        assert_eq!(Key::of(7, &post), None);
        let mut head = Request::head("/app/x?y=1").body(()).unwrap();
        head.headers_mut()
            .insert(header::HOST, HeaderValue::from_static("shop.example"));
        assert_eq!(Key::of(7, &head), Some(key));
    }

    fn key(target: &str) -> Key {
        Key {
            version: 1,
            host: "h".into(),
            target: target.into(),
        }
    }

    fn ticket(cache: &ResponseCache, target: &str) -> Ticket {
        match cache.lookup(&key(target), &HeaderMap::new()) {
            Lookup::Miss(ticket) => ticket,
            Lookup::Hit(_) => panic!("{target} is a hit"),
            Lookup::Off => panic!("the cache is off"),
        }
    }

    fn put(
        cache: &ResponseCache,
        t: Ticket,
        app: &str,
        target: &str,
        body: &str,
        tags: &[&str],
    ) -> bool {
        cache.insert(
            Answer {
                ticket: t,
                key: key(target),
                app: Arc::from(app),
                status: StatusCode::OK,
                headers: HeaderMap::new(),
                ttl: Duration::from_secs(60),
                vary: Vec::new(),
                tags: tags.iter().map(|t| Box::from(*t)).collect(),
            },
            Bytes::copy_from_slice(body.as_bytes()),
        )
    }

    fn hit(cache: &ResponseCache, target: &str) -> bool {
        matches!(
            cache.lookup(&key(target), &HeaderMap::new()),
            Lookup::Hit(_)
        )
    }

    #[test]
    fn purges_drop_by_tag_or_app_and_stale_answers_stay_out() {
        let cache = ResponseCache::new(1 << 20);
        let t = ticket(&cache, "/a");
        assert!(put(&cache, t, "shop", "/a", "a", &["product-1", "list"]));
        let t = ticket(&cache, "/b");
        assert!(put(&cache, t, "shop", "/b", "b", &["product-2", "list"]));
        let t = ticket(&cache, "/c");
        assert!(put(&cache, t, "blog", "/c", "c", &["list"]));
        assert!(hit(&cache, "/a") && hit(&cache, "/b") && hit(&cache, "/c"));

        assert_eq!(cache.purge("shop", &["product-1"]), 1);
        assert!(!hit(&cache, "/a") && hit(&cache, "/b") && hit(&cache, "/c"));
        // A tag belongs to its app: blog's "list" stays.
        assert_eq!(cache.purge("shop", &["list"]), 1);
        assert!(hit(&cache, "/c"));

        // An answer whose request began before a purge of one of its tags is not kept...
        let before = ticket(&cache, "/d");
        cache.purge("shop", &["p"]);
        assert!(!put(&cache, before, "shop", "/d", "d", &["p", "q"]));
        assert!(!hit(&cache, "/d"));
        // ...but one with other tags is, and so is one of another app with that tag.
        assert!(put(&cache, before, "shop", "/d", "d", &["q"]));
        assert!(put(&cache, before, "blog", "/e", "e", &["p"]));
        // After a purge of all of an app's responses, none begun before it is kept.
        let before = ticket(&cache, "/f");
        cache.purge("shop", &[]);
        assert!(!put(&cache, before, "shop", "/f", "f", &[]));
        assert!(!hit(&cache, "/d"));
        assert!(put(&cache, before, "blog", "/f", "f", &[]));

        assert_eq!(cache.purge("blog", &[]), 3);
        assert_eq!(cache.report().entries, 0);
        assert_eq!(cache.report().bytes, 0);
    }

    #[test]
    fn the_least_recently_used_go_first_and_bytes_stay_bounded() {
        let cache = ResponseCache::new(16 * 1024);
        for n in 0..4 {
            let target = format!("/{n}");
            let t = ticket(&cache, &target);
            assert!(put(&cache, t, "app", &target, &"x".repeat(700), &["t"]));
        }
        assert!(hit(&cache, "/0"));
        for n in 4..40 {
            let target = format!("/{n}");
            let t = ticket(&cache, &target);
            put(&cache, t, "app", &target, &"x".repeat(700), &["t"]);
            assert!(cache.report().bytes <= 16 * 1024);
            // Used at every turn, /0 stays.
            assert!(hit(&cache, "/0"));
        }
        assert!(!hit(&cache, "/1"));
        // The tag index forgot what was evicted.
        let entries = cache.report().entries as usize;
        assert_eq!(cache.purge("app", &["t"]), entries);
        assert!(cache.inner().tagged.is_empty());
        // Larger than a sixteenth of the cache (and some headers' worth): not kept.
        let t = ticket(&cache, "/big");
        assert!(!put(&cache, t, "app", "/big", &"x".repeat(70 * 1024), &[]));
    }

    #[test]
    fn vary_and_expiry_make_misses() {
        let cache = ResponseCache::new(1 << 20);
        let t = ticket(&cache, "/v");
        cache.insert(
            Answer {
                ticket: t,
                key: key("/v"),
                app: Arc::from("app"),
                status: StatusCode::OK,
                headers: HeaderMap::new(),
                ttl: Duration::from_secs(60),
                vary: vec![(
                    header::ACCEPT_LANGUAGE,
                    vec![HeaderValue::from_static("fr")],
                )],
                tags: Vec::new(),
            },
            Bytes::from_static(b"fr"),
        );
        let fr = headers(&[("accept-language", "fr")]);
        assert!(matches!(cache.lookup(&key("/v"), &fr), Lookup::Hit(_)));
        assert!(matches!(
            cache.lookup(&key("/v"), &headers(&[("accept-language", "de")])),
            Lookup::Miss(_)
        ));
        assert!(matches!(
            cache.lookup(&key("/v"), &HeaderMap::new()),
            Lookup::Miss(_)
        ));

        let t = ticket(&cache, "/old");
        cache.insert(
            Answer {
                ticket: t,
                key: key("/old"),
                app: Arc::from("app"),
                status: StatusCode::OK,
                headers: HeaderMap::new(),
                ttl: Duration::ZERO,
                vary: Vec::new(),
                tags: Vec::new(),
            },
            Bytes::from_static(b"old"),
        );
        assert!(!hit(&cache, "/old"));
        assert_eq!(
            cache.report().entries,
            1,
            "the expired entry went at its lookup"
        );
    }

    #[test]
    fn an_off_cache_serves_and_keeps_nothing_and_comes_back_empty() {
        let cache = ResponseCache::new(1 << 20);
        let t = ticket(&cache, "/a");
        assert!(put(&cache, t, "app", "/a", "a", &[]));
        let t = ticket(&cache, "/b");
        cache.set_off(Some("cannot read".into()));
        assert!(matches!(
            cache.lookup(&key("/a"), &HeaderMap::new()),
            Lookup::Off
        ));
        assert!(!put(&cache, t, "app", "/b", "b", &[]));
        cache.set_off(None);
        assert!(!hit(&cache, "/a"));
        assert_eq!(cache.report().entries, 0);
        // A request begun before it went off is not kept after.
        assert!(!put(&cache, t, "app", "/b", "b", &[]));
    }

    /// A body that sends its bytes and then never ends, as one whose end hyper does not wait
    /// for (it knows the length).
    struct NeverEnds(Option<Bytes>);

    impl http_body::Body for NeverEnds {
        type Data = Bytes;
        type Error = crate::server::BoxError;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            match self.0.take() {
                Some(bytes) => Poll::Ready(Some(Ok(Frame::data(bytes)))),
                None => Poll::Pending,
            }
        }
    }

    #[tokio::test]
    async fn a_body_of_known_length_is_kept_without_its_end_and_hop_headers_are_not() {
        let cache = Arc::new(ResponseCache::new(1 << 20));
        let Lookup::Miss(t) = cache.lookup(&key("/len"), &HeaderMap::new()) else {
            panic!("a miss first");
        };
        let mut response =
            Response::new(NeverEnds(Some(Bytes::from_static(b"hello"))).boxed_unsync());
        *response.headers_mut() = headers(&[
            ("content-length", "5"),
            ("connection", "keep-alive"),
            ("x-paddock-server", "fe1"),
            ("age", "100"),
            ("cache-control", "max-age=60"),
            ("etag", "\"v1\""),
        ]);
        let kept = keep(StatusCode::OK, response.headers()).unwrap();
        let mut recorded = cache.record(
            t,
            key("/len"),
            Arc::from("app"),
            kept,
            &HeaderMap::new(),
            response,
            Vec::new(),
        );
        assert_eq!(recorded.headers()[STATUS_HEADER], "miss");
        let frame = recorded.body_mut().frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "hello");
        drop(recorded);

        let Lookup::Hit(entry) = cache.lookup(&key("/len"), &HeaderMap::new()) else {
            panic!("a body whose length went by is kept");
        };
        let answer = entry.response();
        let h = answer.headers();
        assert_eq!(h["etag"], "\"v1\"");
        assert_eq!(h["cache-control"], "max-age=60");
        assert_eq!(h[STATUS_HEADER], "hit");
        assert_eq!(h["age"], "0");
        for gone in ["connection", "x-paddock-server", "content-length"] {
            assert!(h.get(gone).is_none(), "{gone} kept");
        }
        let body = answer.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "hello");

        // An empty body is kept at once (hyper may not poll it at all).
        let Lookup::Miss(t) = cache.lookup(&key("/empty"), &HeaderMap::new()) else {
            panic!("a miss first");
        };
        let mut response = Response::new(
            http_body_util::Empty::<Bytes>::new()
                .map_err(|never| match never {})
                .boxed_unsync(),
        );
        *response.status_mut() = StatusCode::NO_CONTENT;
        *response.headers_mut() = headers(&[("cache-control", "max-age=60")]);
        let kept = keep(StatusCode::NO_CONTENT, response.headers()).unwrap();
        drop(cache.record(
            t,
            key("/empty"),
            Arc::from("app"),
            kept,
            &HeaderMap::new(),
            response,
            Vec::new(),
        ));
        assert!(hit(&cache, "/empty"));
    }

    struct FakeLog {
        purges: Mutex<Vec<CachePurge>>,
        down: std::sync::atomic::AtomicBool,
        /// Reads never answer.
        hangs: std::sync::atomic::AtomicBool,
    }

    #[async_trait::async_trait]
    impl PurgeLog for FakeLog {
        async fn last(&self) -> anyhow::Result<i64> {
            if self.down.load(Ordering::SeqCst) {
                anyhow::bail!("database unreachable");
            }
            Ok(self.purges.lock().unwrap().last().map_or(0, |p| p.id))
        }

        async fn after(&self, id: i64, limit: u32) -> anyhow::Result<Vec<CachePurge>> {
            if self.down.load(Ordering::SeqCst) {
                anyhow::bail!("database unreachable");
            }
            if self.hangs.load(Ordering::SeqCst) {
                std::future::pending::<()>().await;
            }
            Ok(self
                .purges
                .lock()
                .unwrap()
                .iter()
                .filter(|p| p.id > id)
                .take(limit as usize)
                .cloned()
                .collect())
        }
    }

    async fn until(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !done() {
            assert!(Instant::now() < deadline, "{what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn the_log_is_followed_and_a_cache_that_cannot_read_it_goes_off() {
        let log = Arc::new(FakeLog {
            purges: Mutex::new(vec![CachePurge {
                id: 3,
                app: "app".into(),
                tag: None,
                at_ms: 0,
                source: "admin".into(),
            }]),
            down: std::sync::atomic::AtomicBool::new(true),
            hangs: std::sync::atomic::AtomicBool::new(false),
        });
        let cache = Arc::new(ResponseCache::following(1 << 20));
        assert!(matches!(
            cache.lookup(&key("/a"), &HeaderMap::new()),
            Lookup::Off
        ));
        let notify = Arc::new(tokio::sync::Notify::new());
        tokio::spawn(
            cache
                .clone()
                .follow(log.clone(), Duration::from_millis(10), notify.clone()),
        );
        // Off until the log has been read once.
        until("off while the log is unread", || {
            cache
                .off()
                .is_some_and(|why| why.contains("database unreachable"))
        })
        .await;
        log.down.store(false, Ordering::SeqCst);
        until("on once read", || cache.off().is_none()).await;
        // Purges from before it started are not applied; it starts at the newest.
        assert_eq!(cache.report().purged, 3);

        let t = ticket(&cache, "/a");
        assert!(put(&cache, t, "app", "/a", "a", &["x"]));
        let t = ticket(&cache, "/b");
        assert!(put(&cache, t, "app", "/b", "b", &["y"]));
        log.purges.lock().unwrap().push(CachePurge {
            id: 4,
            app: "app".into(),
            tag: Some("x".into()),
            at_ms: 0,
            source: "server fe-2".into(),
        });
        until("purge 4 applied", || cache.report().purged == 4).await;
        assert!(!hit(&cache, "/a") && hit(&cache, "/b"));
        // A purge this server wrote (and applied) itself is not applied again when read.
        cache.written(&[5]);
        log.purges.lock().unwrap().push(CachePurge {
            id: 5,
            app: "app".into(),
            tag: Some("y".into()),
            at_ms: 0,
            source: "server fe-1".into(),
        });
        until("purge 5 read", || cache.report().purged == 5).await;
        assert!(hit(&cache, "/b"));

        // A log that does not answer for BLIND_AFTER: off at once, and empty when it reads
        // again.
        let hanging = Instant::now();
        log.hangs.store(true, Ordering::SeqCst);
        until("off after BLIND_AFTER", || !hit(&cache, "/b")).await;
        // (The last read was at most one poll interval before the hang.)
        assert!(hanging.elapsed() >= BLIND_AFTER - Duration::from_millis(50));
        assert!(hanging.elapsed() < BLIND_AFTER + Duration::from_secs(1));
        assert!(matches!(
            cache.lookup(&key("/b"), &HeaderMap::new()),
            Lookup::Off
        ));
        until("off, saying why", || {
            cache
                .off()
                .is_some_and(|why| why.contains("no answer within"))
        })
        .await;
        log.hangs.store(false, Ordering::SeqCst);
        until("on again", || cache.off().is_none()).await;
        assert!(!hit(&cache, "/b"));
    }
}
