//! The apps' data on this front-end: the farm's database, opened with `--db`, behind the
//! runtime's [`AppData`], and the session cookie of each request.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{HeaderMap, HeaderValue, header};
use paddock_core::data::{Scope, SessionFound, session_cookie};
use paddock_runtime::{AppData, AppSpec, Session};
use paddock_store::SqlStore;

/// Opens the database for the apps' data. A front-end of a farm leaves migrations to the
/// controller; a front-end on its own (`--apps`) owns its database and migrates it.
/// Without a controller, it also forgets expired sessions every minute, as a controller does.
pub async fn open(url: &str, standalone: bool) -> anyhow::Result<Arc<SqlStore>> {
    let store = if standalone {
        SqlStore::open(url).await
    } else {
        SqlStore::open_data(url).await
    };
    let store =
        Arc::new(store.map_err(|e| anyhow::anyhow!("opening --db {url} for the apps' data: {e}"))?);
    if standalone {
        tokio::spawn(SqlStore::sweep_sessions_every_minute(store.clone()));
    }
    Ok(store)
}

/// The apps' data in the farm's database, as the runtime reaches it.
pub fn app_data(store: Arc<SqlStore>) -> Arc<dyn AppData> {
    Arc::new(StoreData(store))
}

struct StoreData(Arc<SqlStore>);

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

#[async_trait::async_trait]
impl AppData for StoreData {
    async fn get(&self, app: &str, scope: Scope<'_>, key: &str) -> anyhow::Result<Option<Vec<u8>>> {
        Ok(self.0.data_get(app, scope, key).await?)
    }

    async fn set(
        &self,
        app: &str,
        scope: Scope<'_>,
        key: &str,
        value: &[u8],
    ) -> anyhow::Result<()> {
        Ok(self.0.data_set(app, scope, key, value).await?)
    }

    async fn delete(&self, app: &str, scope: Scope<'_>, key: &str) -> anyhow::Result<()> {
        Ok(self.0.data_delete(app, scope, key).await?)
    }

    async fn keys(
        &self,
        app: &str,
        scope: Scope<'_>,
        after: Option<&str>,
        limit: u64,
    ) -> anyhow::Result<Vec<String>> {
        Ok(self.0.data_keys(app, scope, after, limit).await?)
    }

    async fn increment(
        &self,
        app: &str,
        scope: Scope<'_>,
        key: &str,
        delta: u64,
    ) -> anyhow::Result<u64> {
        Ok(self.0.data_increment(app, scope, key, delta).await?)
    }

    async fn session_touch(
        &self,
        app: &str,
        id: &str,
        idle: Duration,
        may_extend: bool,
    ) -> anyhow::Result<SessionFound> {
        Ok(self
            .0
            .session_touch(app, id, now_ms(), millis(idle), may_extend)
            .await?)
    }

    async fn session_create(&self, app: &str, id: &str, idle: Duration) -> anyhow::Result<()> {
        Ok(self
            .0
            .session_create(app, id, now_ms(), millis(idle))
            .await?)
    }
}

/// The session of a request to `app`, named by its cookie if it has one.
pub fn session(headers: &HeaderMap, app: &AppSpec) -> Arc<Session> {
    let id = cookie(headers, &session_cookie(&app.name));
    Arc::new(Session::new(id, app.limits.session_idle))
}

/// The value of the first cookie called `name` in the request's `Cookie` headers.
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find_map(|(key, value)| (key == name).then_some(value))
}

/// Whether the balancer says the request came over HTTPS (`X-Forwarded-Proto: https`; a
/// Paddock balancer replaces whatever the client sent). Trusting a client that reaches the
/// front-end directly and claims it only makes that client's own cookie `Secure`.
pub fn came_over_https(headers: &HeaderMap) -> bool {
    headers
        .get("x-forwarded-proto")
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"https"))
}

/// The `Set-Cookie` of a session the request started or extended: for the app's route only, out
/// of scripts' reach, kept by the browser as long as the store keeps the session unused, and
/// `Secure` when users reach the farm over HTTPS (`--secure-cookies`, or the request came over
/// HTTPS as [`came_over_https`] says).
pub fn set_cookie(app: &AppSpec, id: &str, max_age: Duration, secure: bool) -> Option<HeaderValue> {
    let secure = if secure { "; Secure" } else { "" };
    HeaderValue::from_str(&format!(
        "{}={id}; Path={}; Max-Age={}; HttpOnly; SameSite=Lax{secure}",
        session_cookie(&app.name),
        app.route,
        max_age.as_secs()
    ))
    .ok()
}

/// Paddock's session cookies are Paddock's: apps share an origin, so one app must neither read
/// another's session id (a cookie of an app at `/` reaches every path) nor set one (fixing
/// another app's users' session). Removes them from the request an app gets.
pub fn strip_request_cookies(headers: &mut HeaderMap) {
    if !headers
        .get_all(header::COOKIE)
        .iter()
        .any(|value| value.as_bytes().windows(PREFIX.len()).any(|w| w == PREFIX))
    {
        return;
    }
    let kept: Vec<HeaderValue> = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| {
            let text = value.to_str().ok()?;
            let pairs: Vec<&str> = text
                .split(';')
                .map(str::trim)
                .filter(|pair| !pair.as_bytes().starts_with(PREFIX) && !pair.is_empty())
                .collect();
            (!pairs.is_empty())
                .then(|| HeaderValue::from_str(&pairs.join("; ")).ok())
                .flatten()
        })
        .collect();
    headers.remove(header::COOKIE);
    for value in kept {
        headers.append(header::COOKIE, value);
    }
}

/// Removes the `Set-Cookie`s of Paddock's session cookies an app's response carries (see
/// [`strip_request_cookies`]).
pub fn strip_response_cookies(headers: &mut HeaderMap) {
    if !headers
        .get_all(header::SET_COOKIE)
        .iter()
        .any(|value| value.as_bytes().trim_ascii_start().starts_with(PREFIX))
    {
        return;
    }
    let kept: Vec<HeaderValue> = headers
        .get_all(header::SET_COOKIE)
        .iter()
        .filter(|value| !value.as_bytes().trim_ascii_start().starts_with(PREFIX))
        .cloned()
        .collect();
    headers.remove(header::SET_COOKIE);
    for value in kept {
        headers.append(header::SET_COOKIE, value);
    }
}

const PREFIX: &[u8] = b"paddock_session_";

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> AppSpec {
        AppSpec {
            name: "shop".into(),
            version: "v1".into(),
            route: "/shop".into(),
            component_sha256: String::new(),
            limits: Default::default(),
            config: Default::default(),
        }
    }

    #[test]
    fn the_cookie_names_the_app() {
        let id = "0123456789abcdef0123456789abcdef";
        let mut headers = HeaderMap::new();
        headers.append(
            header::COOKIE,
            HeaderValue::from_static("a=b; paddock_session_blog=ffffffffffffffffffffffffffffffff"),
        );
        headers.append(
            header::COOKIE,
            HeaderValue::from_str(&format!("paddock_session_shop={id}")).unwrap(),
        );
        assert_eq!(cookie(&headers, "paddock_session_shop"), Some(id));
        assert_eq!(cookie(&headers, "a"), Some("b"));
        assert_eq!(cookie(&headers, "paddock_session_cart"), None);
        let set = set_cookie(&spec(), id, Duration::from_secs(1800), true).unwrap();
        assert_eq!(
            set.to_str().unwrap(),
            format!(
                "paddock_session_shop={id}; Path=/shop; Max-Age=1800; HttpOnly; SameSite=Lax; Secure"
            )
        );
        let set = set_cookie(&spec(), id, Duration::from_secs(1800), false).unwrap();
        assert!(!set.to_str().unwrap().contains("Secure"));

        // The app sees the other cookies only.
        strip_request_cookies(&mut headers);
        let left: Vec<_> = headers.get_all(header::COOKIE).iter().collect();
        assert_eq!(left, ["a=b"]);
        let mut only = HeaderMap::new();
        only.append(
            header::COOKIE,
            HeaderValue::from_static("paddock_session_x=1"),
        );
        strip_request_cookies(&mut only);
        assert!(only.get(header::COOKIE).is_none());
    }

    #[test]
    fn an_app_cannot_set_a_session_cookie() {
        let mut headers = HeaderMap::new();
        headers.append(header::SET_COOKIE, HeaderValue::from_static("theme=dark"));
        headers.append(
            header::SET_COOKIE,
            HeaderValue::from_static(
                "paddock_session_shop=0123456789abcdef0123456789abcdef; Path=/shop",
            ),
        );
        strip_response_cookies(&mut headers);
        let left: Vec<_> = headers.get_all(header::SET_COOKIE).iter().collect();
        assert_eq!(left, ["theme=dark"]);
    }
}
