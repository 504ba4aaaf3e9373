//! Request ids: the balancer gives each request one (or keeps the one a client or a proxy in
//! front of it sent) in [`HEADER`]; the front-end tags the app's log lines with it, hands it to
//! the app as `PADDOCK_REQUEST_ID` and says it back on the response; the balancer's access log
//! has it. One id follows a request through every log.

/// The header that carries a request's id.
pub const HEADER: &str = "x-request-id";

/// The longest id kept; a longer one is replaced.
pub const MAX_LEN: usize = 128;

/// Whether `id` may be kept as a request's id: 1 to [`MAX_LEN`] letters, digits and
/// `-._:@/+=`, so that it reads the same in a log line, a header and an environment variable.
pub fn is_valid(id: &[u8]) -> bool {
    (1..=MAX_LEN).contains(&id.len())
        && id
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b"-._:@/+=".contains(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_that_read_the_same_everywhere_are_kept_and_others_not() {
        for id in [
            "lb1-19adb3c2e11-2a",
            "7f3e9c1a-5b2d-4e8f-9a0b-1c2d3e4f5a6b",
            "a",
            "req:1/2+3=4@x_y.z",
        ] {
            assert!(is_valid(id.as_bytes()), "{id}");
        }
        let long = "a".repeat(MAX_LEN + 1);
        for id in [
            "",
            "two words",
            "quote\"",
            "line\nbreak",
            "semi;colon",
            long.as_str(),
        ] {
            assert!(!is_valid(id.as_bytes()), "{id:?}");
        }
        assert!(!is_valid("é".as_bytes()));
    }
}
