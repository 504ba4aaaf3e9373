//! App data through `wasi:keyvalue` (0.2.0-draft: `store`, `atomics`, `batch`): the host side.
//!
//! `open("")` or `open(NAME)` gives one of the app's buckets, shared by all its versions on every
//! front-end; `open("session")` gives the current user's session. What backs them is an
//! [`AppData`] the front-end hands to each request (the farm's store); the runtime only knows
//! the trait. A session is resolved lazily, at its first use in a request: the id from the
//! request's cookie if the store knows it (which extends its life), else none, and a first write
//! then creates one with a fresh random id (never one the client chose). The front-end sends
//! that id back in a cookie (again when the session is extended, so that the browser keeps it
//! as long as the store does), which it can only do while the response head is not sent: a
//! session created after that is refused.

use std::sync::Arc;
use std::time::Duration;

use paddock_core::data::{
    LIST_PAGE, SESSION_BUCKET, Scope, SessionFound, bucket_problem, key_problem, value_problem,
};
use wasmtime::component::Resource;

use crate::host::Host;

mod bindings {
    wasmtime::component::bindgen!({
        path: "wit",
        world: "paddock:host/app-data",
        imports: { default: async | trappable },
        require_store_data_send: true,
        with: {
            "wasi:keyvalue/store.bucket": super::Bucket,
        },
        trappable_error_type: {
            "wasi:keyvalue/store.error" => super::KvError,
        },
    });
}

use bindings::wasi::keyvalue::{atomics, batch, store};

/// The store behind the apps' data: the farm's database, as the front-end opened it.
#[async_trait::async_trait]
pub trait AppData: Send + Sync + 'static {
    async fn get(&self, app: &str, scope: Scope<'_>, key: &str) -> anyhow::Result<Option<Vec<u8>>>;
    async fn set(&self, app: &str, scope: Scope<'_>, key: &str, value: &[u8])
    -> anyhow::Result<()>;
    async fn delete(&self, app: &str, scope: Scope<'_>, key: &str) -> anyhow::Result<()>;
    /// Up to `limit` keys in key order, after `after` (from the first without it).
    async fn keys(
        &self,
        app: &str,
        scope: Scope<'_>,
        after: Option<&str>,
        limit: u64,
    ) -> anyhow::Result<Vec<String>>;
    /// Adds `delta` to the decimal number at `key` (0 if none), atomically; returns the sum.
    async fn increment(
        &self,
        app: &str,
        scope: Scope<'_>,
        key: &str,
        delta: u64,
    ) -> anyhow::Result<u64>;
    /// Uses a session, extending a live one by `idle` (not at every use: see
    /// [`SessionFound`]); with `may_extend` false, only looks at it.
    async fn session_touch(
        &self,
        app: &str,
        id: &str,
        idle: Duration,
        may_extend: bool,
    ) -> anyhow::Result<SessionFound>;
    async fn session_create(&self, app: &str, id: &str, idle: Duration) -> anyhow::Result<()>;
}

/// What a request may reach of the app's data.
#[derive(Clone)]
pub struct RequestData {
    pub store: Arc<dyn AppData>,
    /// The user's session; `None` where there is no user (a timer tick).
    pub session: Option<Arc<Session>>,
}

/// One request's session, shared between the instance (which uses it) and the front-end (which
/// sends the cookie of a session the instance created).
pub struct Session {
    /// The id the request's cookie named, if it had the shape of one.
    cookie: Option<String>,
    idle: Duration,
    state: tokio::sync::Mutex<SessionState>,
    /// Set by the runtime when the app sets its response head, before the app goes on.
    head_sent: std::sync::atomic::AtomicBool,
    /// The id the response's cookie must carry: a session created, or extended, before the
    /// head went out. Read without the lock, which a body still running may hold.
    cookie_to_send: std::sync::OnceLock<String>,
}

#[derive(Default)]
struct SessionState {
    /// `None` until first used; then the live session's id, if there is one.
    resolved: Option<Option<String>>,
}

impl Session {
    /// `cookie` is the id the request's cookie carries, if any; it is used only if the store
    /// knows it. `idle` is how long the session lives unused (the app's `session_idle`).
    pub fn new(cookie: Option<&str>, idle: Duration) -> Session {
        Session {
            cookie: cookie
                .filter(|id| paddock_core::data::is_session_id(id))
                .map(str::to_string),
            idle,
            state: tokio::sync::Mutex::new(SessionState::default()),
            head_sent: std::sync::atomic::AtomicBool::new(false),
            cookie_to_send: std::sync::OnceLock::new(),
        }
    }

    /// Whether the request named a session (a cookie with the shape of an id): a user's
    /// request, which the response cache leaves to the app.
    pub fn has_cookie(&self) -> bool {
        self.cookie.is_some()
    }

    /// How long the session lives unused; the cookie's `Max-Age`.
    pub fn idle(&self) -> Duration {
        self.idle
    }

    /// Called by the runtime as the app sets its response head: from then on, no session can
    /// be created (its cookie could not be sent).
    pub(crate) fn mark_head_sent(&self) {
        self.head_sent
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// The id the response's cookie must carry, if the app started a session, or used one that
    /// was then extended, before its head. Asked once the response head is out.
    pub fn cookie(&self) -> Option<&str> {
        self.cookie_to_send.get().map(String::as_str)
    }

    fn head_is_sent(&self) -> bool {
        self.head_sent.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Notes that the response must carry `id`, if its head is not out yet.
    fn send_cookie(&self, id: &str) {
        if !self.head_is_sent() {
            let _ = self.cookie_to_send.set(id.to_string());
        }
    }

    /// The live session's id, if there is one (resolving the cookie at first use).
    async fn current(&self, data: &RequestData, app: &str) -> Result<Option<String>, KvError> {
        let mut state = self.state.lock().await;
        if let Some(resolved) = &state.resolved {
            return Ok(resolved.clone());
        }
        let live = match &self.cookie {
            Some(id) => match data
                .store
                // Once the head is out, the cookie of an extension could not go with it: the
                // session is only looked at, and a later request extends it.
                .session_touch(app, id, self.idle, !self.head_is_sent())
                .await
                .map_err(KvError::store)?
            {
                SessionFound::Missing => None,
                SessionFound::Live => Some(id.clone()),
                SessionFound::Extended => {
                    // The browser keeps the cookie as long as the store keeps the session.
                    self.send_cookie(id);
                    Some(id.clone())
                }
            },
            None => None,
        };
        state.resolved = Some(live.clone());
        Ok(live)
    }

    /// The live session's id, creating a session if there is none.
    async fn current_or_new(&self, data: &RequestData, app: &str) -> Result<String, KvError> {
        if let Some(id) = self.current(data, app).await? {
            return Ok(id);
        }
        let mut state = self.state.lock().await;
        if let Some(Some(id)) = &state.resolved {
            return Ok(id.clone());
        }
        if self.head_is_sent() {
            return Err(KvError::Other(
                "a session cannot start after the response head was sent (its cookie goes in the head): write to the session before responding".into(),
            ));
        }
        let mut bytes = [0u8; 16];
        getrandom::fill(&mut bytes)
            .map_err(|e| KvError::Other(format!("no randomness for a session id: {e}")))?;
        let id = hex::encode(bytes);
        data.store
            .session_create(app, &id, self.idle)
            .await
            .map_err(KvError::store)?;
        self.send_cookie(&id);
        state.resolved = Some(Some(id.clone()));
        Ok(id)
    }
}

/// A bucket the app opened.
pub struct Bucket {
    kind: BucketKind,
}

enum BucketKind {
    Named(String),
    Session,
}

/// Why a call failed, as the app sees it (`wasi:keyvalue/store.error`).
pub enum KvError {
    NoSuchStore,
    Other(String),
}

impl KvError {
    fn store(e: anyhow::Error) -> KvError {
        KvError::Other(format!("the farm's store failed: {e:#}"))
    }
}

impl From<wasmtime::component::ResourceTableError> for KvError {
    fn from(e: wasmtime::component::ResourceTableError) -> KvError {
        KvError::Other(e.to_string())
    }
}

pub(crate) fn add_to_linker(linker: &mut wasmtime::component::Linker<Host>) -> anyhow::Result<()> {
    type Data = wasmtime::component::HasSelf<Host>;
    store::add_to_linker::<Host, Data>(linker, |host| host).map_err(anyhow::Error::from)?;
    atomics::add_to_linker::<Host, Data>(linker, |host| host).map_err(anyhow::Error::from)?;
    batch::add_to_linker::<Host, Data>(linker, |host| host).map_err(anyhow::Error::from)?;
    Ok(())
}

/// Where a bucket's values live, for this request: its scope and what it takes to reach it.
struct Target<'a> {
    data: &'a RequestData,
    app: &'a str,
    scope_owner: ScopeOwner,
}

enum ScopeOwner {
    Bucket(String),
    /// The session's id, or none (a read of a session never written: nothing there).
    Session(Option<String>),
}

impl Target<'_> {
    fn scope(&self) -> Option<Scope<'_>> {
        match &self.scope_owner {
            ScopeOwner::Bucket(name) => Some(Scope::Bucket(name)),
            ScopeOwner::Session(Some(id)) => Some(Scope::Session(id)),
            ScopeOwner::Session(None) => None,
        }
    }
}

impl Host {
    fn data(&self) -> Result<&RequestData, KvError> {
        self.data.as_ref().ok_or_else(|| {
            KvError::Other(
                "this front-end keeps no app data: start it with --db (the farm's database, as the controller's --db)"
                    .into(),
            )
        })
    }

    /// Where `bucket`'s values live; `write` creates the session if the request has none.
    async fn target(
        &mut self,
        bucket: &Resource<Bucket>,
        write: bool,
    ) -> Result<Target<'_>, KvError> {
        let named = match &self.table.get(bucket)?.kind {
            BucketKind::Named(name) => Some(name.clone()),
            BucketKind::Session => None,
        };
        let data = self.data()?;
        let app = self.app.as_str();
        let scope_owner = match named {
            Some(name) => ScopeOwner::Bucket(name),
            None => {
                let session = data.session.as_ref().ok_or_else(no_session)?;
                ScopeOwner::Session(if write {
                    Some(session.current_or_new(data, app).await?)
                } else {
                    session.current(data, app).await?
                })
            }
        };
        Ok(Target {
            data,
            app,
            scope_owner,
        })
    }
}

fn no_session() -> KvError {
    KvError::Other("there is no session here: a timer tick has no user".into())
}

fn check_key(key: &str) -> Result<(), KvError> {
    match key_problem(key) {
        Some(problem) => Err(KvError::Other(problem)),
        None => Ok(()),
    }
}

fn check_value(key: &str, value: &[u8]) -> Result<(), KvError> {
    match value_problem(key, value.len()) {
        Some(problem) => Err(KvError::Other(problem)),
        None => Ok(()),
    }
}

impl store::Host for Host {
    async fn open(&mut self, identifier: String) -> Result<Resource<Bucket>, KvError> {
        self.data()?;
        let kind = if identifier == SESSION_BUCKET {
            BucketKind::Session
        } else if let Some(problem) = bucket_problem(&identifier) {
            return Err(KvError::Other(problem));
        } else {
            BucketKind::Named(identifier)
        };
        Ok(self.table.push(Bucket { kind })?)
    }

    fn convert_error(&mut self, err: KvError) -> wasmtime::Result<store::Error> {
        Ok(match err {
            KvError::NoSuchStore => store::Error::NoSuchStore,
            KvError::Other(message) => store::Error::Other(message),
        })
    }
}

impl store::HostBucket for Host {
    async fn get(
        &mut self,
        bucket: Resource<Bucket>,
        key: String,
    ) -> Result<Option<Vec<u8>>, KvError> {
        check_key(&key)?;
        let target = self.target(&bucket, false).await?;
        match target.scope() {
            Some(scope) => target
                .data
                .store
                .get(target.app, scope, &key)
                .await
                .map_err(KvError::store),
            None => Ok(None),
        }
    }

    async fn set(
        &mut self,
        bucket: Resource<Bucket>,
        key: String,
        value: Vec<u8>,
    ) -> Result<(), KvError> {
        check_value(&key, &value)?;
        let target = self.target(&bucket, true).await?;
        let scope = target.scope().ok_or_else(no_session)?;
        target
            .data
            .store
            .set(target.app, scope, &key, &value)
            .await
            .map_err(KvError::store)
    }

    async fn delete(&mut self, bucket: Resource<Bucket>, key: String) -> Result<(), KvError> {
        check_key(&key)?;
        let target = self.target(&bucket, false).await?;
        match target.scope() {
            Some(scope) => target
                .data
                .store
                .delete(target.app, scope, &key)
                .await
                .map_err(KvError::store),
            None => Ok(()),
        }
    }

    async fn exists(&mut self, bucket: Resource<Bucket>, key: String) -> Result<bool, KvError> {
        Ok(store::HostBucket::get(self, bucket, key).await?.is_some())
    }

    async fn list_keys(
        &mut self,
        bucket: Resource<Bucket>,
        cursor: Option<u64>,
    ) -> Result<store::KeyResponse, KvError> {
        // A cursor stands for the last key of the page it ended (kept for this request): the
        // next page starts after that key, so keys deleted meanwhile move nothing.
        let after = match cursor {
            None => None,
            Some(cursor) => Some(
                usize::try_from(cursor)
                    .ok()
                    .and_then(|at| self.cursors.get(at))
                    .cloned()
                    .ok_or_else(|| {
                        KvError::Other(format!(
                            "unknown cursor {cursor}: give back one list-keys returned in this request"
                        ))
                    })?,
            ),
        };
        let target = self.target(&bucket, false).await?;
        let Some(scope) = target.scope() else {
            return Ok(store::KeyResponse {
                keys: Vec::new(),
                cursor: None,
            });
        };
        let mut keys = target
            .data
            .store
            .keys(target.app, scope, after.as_deref(), LIST_PAGE as u64 + 1)
            .await
            .map_err(KvError::store)?;
        let more = keys.len() > LIST_PAGE;
        keys.truncate(LIST_PAGE);
        let cursor = match keys.last() {
            Some(last) if more => {
                self.cursors.push(last.clone());
                Some(self.cursors.len() as u64 - 1)
            }
            _ => None,
        };
        Ok(store::KeyResponse { keys, cursor })
    }

    async fn drop(&mut self, bucket: Resource<Bucket>) -> wasmtime::Result<()> {
        self.table.delete(bucket)?;
        Ok(())
    }
}

impl atomics::Host for Host {
    async fn increment(
        &mut self,
        bucket: Resource<Bucket>,
        key: String,
        delta: u64,
    ) -> Result<u64, KvError> {
        check_key(&key)?;
        let target = self.target(&bucket, true).await?;
        let scope = target.scope().ok_or_else(no_session)?;
        target
            .data
            .store
            .increment(target.app, scope, &key, delta)
            .await
            .map_err(|e| KvError::Other(format!("{e:#}")))
    }
}

impl batch::Host for Host {
    async fn get_many(
        &mut self,
        bucket: Resource<Bucket>,
        keys: Vec<String>,
    ) -> Result<Vec<Option<(String, Vec<u8>)>>, KvError> {
        let mut values = Vec::with_capacity(keys.len());
        for key in keys {
            let value = store::HostBucket::get(self, bucket_again(&bucket), key.clone()).await?;
            values.push(value.map(|value| (key, value)));
        }
        Ok(values)
    }

    async fn set_many(
        &mut self,
        bucket: Resource<Bucket>,
        key_values: Vec<(String, Vec<u8>)>,
    ) -> Result<(), KvError> {
        for (key, value) in key_values {
            store::HostBucket::set(self, bucket_again(&bucket), key, value).await?;
        }
        Ok(())
    }

    async fn delete_many(
        &mut self,
        bucket: Resource<Bucket>,
        keys: Vec<String>,
    ) -> Result<(), KvError> {
        for key in keys {
            store::HostBucket::delete(self, bucket_again(&bucket), key).await?;
        }
        Ok(())
    }
}

/// The same borrowed handle again, for one call more (the calls above take it by value).
fn bucket_again(bucket: &Resource<Bucket>) -> Resource<Bucket> {
    Resource::new_borrow(bucket.rep())
}
