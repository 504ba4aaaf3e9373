//! App data: what apps keep in the farm's store through `wasi:keyvalue`, shared by every
//! front-end. A bucket is the app's own (all its versions see it); a session belongs to one user
//! of one app, named by the `paddock_session_<app>` cookie.

use std::time::Duration;

/// Where a value lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope<'a> {
    /// A bucket of the app, opened by name (`""` is the app's default bucket).
    Bucket(&'a str),
    /// A user's session, by its id.
    Session(&'a str),
}

/// The bucket name that opens the current request's session rather than a bucket.
pub const SESSION_BUCKET: &str = "session";
/// A key longer than this is refused.
pub const MAX_KEY_BYTES: usize = 1024;
/// A value larger than this is refused: the store holds records, not files.
pub const MAX_VALUE_BYTES: usize = 1024 * 1024;
/// A bucket name longer than this is refused.
pub const MAX_BUCKET_BYTES: usize = 128;
/// How many keys one `list-keys` call returns at most; the cursor gives the rest.
pub const LIST_PAGE: usize = 1000;
/// A session unused for this long is gone, with its values, unless the manifest says otherwise.
pub const DEFAULT_SESSION_IDLE: Duration = Duration::from_secs(24 * 3600);

/// Why a key cannot be stored, if it cannot.
pub fn key_problem(key: &str) -> Option<String> {
    if key.len() > MAX_KEY_BYTES {
        return Some(format!(
            "a key of {} bytes is over the limit of {MAX_KEY_BYTES}",
            key.len()
        ));
    }
    key.contains('\0')
        .then(|| format!("key {key:?} holds a NUL character, which keys may not"))
}

/// Why a bucket name cannot be used, if it cannot.
pub fn bucket_problem(name: &str) -> Option<String> {
    (name.len() > MAX_BUCKET_BYTES || name.contains('\0')).then(|| {
        format!("bucket name {name:?}: use at most {MAX_BUCKET_BYTES} bytes and no NUL character")
    })
}

/// Why a value of `len` bytes cannot be stored at `key`, if it cannot.
pub fn value_problem(key: &str, len: usize) -> Option<String> {
    key_problem(key).or_else(|| {
        (len > MAX_VALUE_BYTES).then(|| {
            format!("the value of {key:?} has {len} bytes, over the limit of {MAX_VALUE_BYTES}")
        })
    })
}

/// What using a session found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionFound {
    /// No session of that id, or it expired.
    Missing,
    /// A live session, used again soon after it was last extended: left as it is.
    Live,
    /// A live session, extended to a whole `session_idle` from now: the cookie goes again.
    Extended,
}

/// The name of the cookie that carries an app's session id.
pub fn session_cookie(app: &str) -> String {
    format!("paddock_session_{app}")
}

/// Whether `id` has the shape of a session id Paddock hands out (32 lowercase hex digits), so
/// that anything else in a cookie is ignored before it reaches the store.
pub fn is_session_id(id: &str) -> bool {
    id.len() == 32
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_ids() {
        assert!(is_session_id("0123456789abcdef0123456789abcdef"));
        assert!(!is_session_id("0123456789ABCDEF0123456789abcdef"));
        assert!(!is_session_id("0123"));
        assert!(!is_session_id("0123456789abcdef0123456789abcdeg"));
        assert_eq!(session_cookie("shop"), "paddock_session_shop");
    }

    #[test]
    fn limits() {
        assert_eq!(key_problem("cart"), None);
        assert!(key_problem("a\0b").unwrap().contains("NUL"));
        assert!(
            key_problem(&"k".repeat(MAX_KEY_BYTES + 1))
                .unwrap()
                .contains("over the limit")
        );
        assert_eq!(bucket_problem(""), None);
        assert!(bucket_problem(&"b".repeat(MAX_BUCKET_BYTES + 1)).is_some());
        assert_eq!(value_problem("k", MAX_VALUE_BYTES), None);
        assert!(
            value_problem("k", MAX_VALUE_BYTES + 1)
                .unwrap()
                .contains("has 1048577 bytes")
        );
    }
}
