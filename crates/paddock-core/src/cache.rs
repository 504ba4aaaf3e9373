//! The names the response cache shares between apps, front-ends, the controller and the CLI.

/// The response header in which an app tags a cacheable response (comma-separated tags). The
/// front-end keeps the tags with the response and does not send the header on.
pub const TAG_HEADER: &str = "paddock-cache-tag";

/// The response header in which an app purges its cached responses with these tags on every
/// front-end of the farm (comma-separated; `*` for all of them). Not sent on either.
pub const PURGE_HEADER: &str = "paddock-cache-purge";

/// The response header that says whether a response came from the cache (`hit`) or was kept
/// for the next requests (`miss`).
pub const STATUS_HEADER: &str = "x-paddock-cache";

pub const MAX_TAG_LEN: usize = 128;

/// Who wrote a purge an operator made (`paddock cache purge`), in the farm's purge log; an app's
/// purge is written as `server NAME`.
pub const ADMIN_SOURCE: &str = "admin";

/// What is wrong with a cache tag, if anything: 1 to 128 visible ASCII characters, no comma
/// (the separator), and not `*` (all of an app's responses).
pub fn tag_problem(tag: &str) -> Option<String> {
    if tag.is_empty() || tag.len() > MAX_TAG_LEN {
        return Some(format!(
            "cache tag {tag:?} must be 1 to {MAX_TAG_LEN} characters long"
        ));
    }
    if tag == "*" {
        return Some(
            "cache tag \"*\" means every response of the app: purge without a tag for that"
                .to_string(),
        );
    }
    if let Some(c) = tag.chars().find(|c| !c.is_ascii_graphic() || *c == ',') {
        return Some(format!(
            "cache tag {tag:?} has {c:?}: tags are visible ASCII characters without commas"
        ));
    }
    None
}

/// The tags of a header value: comma-separated, spaces around them ignored, empty ones skipped.
pub fn tags(value: &str) -> impl Iterator<Item = &str> {
    value.split(',').map(str::trim).filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_are_visible_ascii_without_commas() {
        assert_eq!(tag_problem("product-42"), None);
        assert_eq!(tag_problem("a:b/c"), None);
        assert!(tag_problem("").is_some());
        assert!(tag_problem("*").is_some());
        assert!(tag_problem("a b").is_some());
        assert!(tag_problem("a,b").is_some());
        assert!(tag_problem("é").is_some());
        assert!(tag_problem(&"x".repeat(MAX_TAG_LEN + 1)).is_some());
        assert_eq!(tag_problem(&"x".repeat(MAX_TAG_LEN)), None);
    }

    #[test]
    fn a_header_value_splits_on_commas() {
        assert_eq!(tags(" a, b ,,c ").collect::<Vec<_>>(), vec!["a", "b", "c"]);
    }
}
