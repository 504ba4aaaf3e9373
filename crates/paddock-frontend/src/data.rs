//! The apps' data on this front-end: the farm's database, opened with `--db`, behind the
//! runtime's [`AppData`], and the session cookie of each request.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{HeaderMap, HeaderValue, header};
use paddock_core::data::{Scope, session_cookie};
use paddock_runtime::{AppData, AppSpec, Session};
use paddock_store::SqlStore;

/// Opens the database for the apps' data. A front-end of a farm leaves migrations to the
/// controller; a front-end on its own (`--apps`) owns its database and migrates it.
pub async fn open(url: &str, standalone: bool) -> anyhow::Result<Arc<dyn AppData>> {
    let store = if standalone {
        SqlStore::open(url).await
    } else {
        SqlStore::open_data(url).await
    };
    let store = store.map_err(|e| anyhow::anyhow!("opening --db {url} for the apps' data: {e}"))?;
    Ok(Arc::new(StoreData(store)))
}

struct StoreData(SqlStore);

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
        offset: u64,
        limit: u64,
    ) -> anyhow::Result<Vec<String>> {
        Ok(self.0.data_keys(app, scope, offset, limit).await?)
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

    async fn session_touch(&self, app: &str, id: &str, idle: Duration) -> anyhow::Result<bool> {
        Ok(self
            .0
            .session_touch(app, id, now_ms(), millis(idle))
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

/// The `Set-Cookie` of a session just created: for the app's route only, out of scripts' reach,
/// and `Secure` when the client came over HTTPS (as the balancer in front says).
pub fn set_cookie(app: &AppSpec, id: &str, https: bool) -> Option<HeaderValue> {
    let secure = if https { "; Secure" } else { "" };
    HeaderValue::from_str(&format!(
        "{}={id}; Path={}; HttpOnly; SameSite=Lax{secure}",
        session_cookie(&app.name),
        app.route
    ))
    .ok()
}

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
        let set = set_cookie(&spec(), id, true).unwrap();
        assert_eq!(
            set.to_str().unwrap(),
            format!("paddock_session_shop={id}; Path=/shop; HttpOnly; SameSite=Lax; Secure")
        );
        let set = set_cookie(&spec(), id, false).unwrap();
        assert!(!set.to_str().unwrap().contains("Secure"));
    }
}
