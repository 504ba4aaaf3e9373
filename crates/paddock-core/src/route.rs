//! Path-prefix routes: which requests belong to which app.

/// Paths under this prefix belong to Paddock itself (health, later internals); no app may claim them.
pub const RESERVED_PREFIX: &str = "/_paddock";

/// Whether `path` (without query) falls under `route`. Prefixes match whole path segments:
/// `/hello` matches `/hello` and `/hello/x` but not `/helloworld`; `/` matches everything.
pub fn route_matches(route: &str, path: &str) -> bool {
    if route == "/" {
        return true;
    }
    match path.strip_prefix(route) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

/// Checks a route as written in a manifest; the error says what is wrong with it.
pub fn validate_route(route: &str) -> Result<(), String> {
    if !route.starts_with('/') {
        return Err("must start with '/'".into());
    }
    if route.len() > 1 && route.ends_with('/') {
        return Err("must not end with '/' (write \"/orders\", not \"/orders/\")".into());
    }
    if route.contains("//") || route.contains(['?', '#', ' ', '%']) {
        return Err("must be a plain path: no '//', '?', '#', '%' or spaces".into());
    }
    // What a client sends unencoded in a path (RFC 3986 `pchar` without percent-encoding):
    // a route with anything else could never match a request.
    if let Some(c) = route
        .chars()
        .find(|&c| !(c.is_ascii_alphanumeric() || "/-._~!$&'()*+,;=:@".contains(c)))
    {
        return Err(format!(
            "contains {c:?}, which clients send percent-encoded: use letters, digits and -._~!$&'()*+,;=:@"
        ));
    }
    if route_matches(RESERVED_PREFIX, route) {
        return Err(format!("{RESERVED_PREFIX} is reserved for Paddock itself"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_match_whole_segments() {
        assert!(route_matches("/hello", "/hello"));
        assert!(route_matches("/hello", "/hello/"));
        assert!(route_matches("/hello", "/hello/a/b"));
        assert!(!route_matches("/hello", "/helloworld"));
        assert!(!route_matches("/hello", "/hell"));
        assert!(route_matches("/", "/anything"));
        assert!(route_matches("/a/b", "/a/b/c"));
        assert!(!route_matches("/a/b", "/a"));
    }

    #[test]
    fn routes_are_validated() {
        assert!(validate_route("/orders").is_ok());
        assert!(validate_route("/").is_ok());
        assert!(validate_route("/a/b").is_ok());
        assert!(validate_route("orders").is_err());
        assert!(validate_route("/orders/").is_err());
        assert!(validate_route("/_paddock").is_err());
        assert!(validate_route("/_paddock/x").is_err());
        assert!(validate_route("/_paddockx").is_ok());
        assert!(validate_route("/a?b").is_err());
        assert!(
            validate_route("/h\u{e9}llo")
                .unwrap_err()
                .contains("'\u{e9}'")
        );
        assert!(validate_route("/a\tb").is_err());
        assert!(validate_route("/a-b_c.d~e/f:g@h").is_ok());
    }
}
