//! Request ids: the balancer gives each request one (or keeps the one a client or a proxy in
//! front of it sent) in [`HEADER`]; the front-end tags the app's log lines with it, hands it to
//! the app as `PADDOCK_REQUEST_ID` and says it back on the response; the balancer's access log
//! has it. One id follows a request through every log.

/// The header that carries a request's id.
pub const HEADER: &str = "x-request-id";

/// The longest id kept; a longer one is replaced.
pub const MAX_LEN: usize = 128;

/// Ids for the requests that come without one: a process's name and when it started (hex
/// ms), then a count (hex): `lb1-19ad8f3c2a1-2a`. Unique in a farm whose servers have names of
/// their own.
#[derive(Debug)]
pub struct Ids {
    prefix: Vec<u8>,
    next: std::sync::atomic::AtomicU64,
}

impl Ids {
    /// Ids of the process `name` started at `started_ms` (ms since the epoch).
    pub fn new(name: &str, started_ms: i64) -> Ids {
        Ids {
            prefix: format!("{name}-{started_ms:x}-").into_bytes(),
            next: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Appends the next id to `out`.
    pub fn push_next(&self, out: &mut Vec<u8>) {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let n = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        out.extend_from_slice(&self.prefix);
        let digits = (u64::BITS - n.leading_zeros()).div_ceil(4).max(1);
        for i in (0..digits).rev() {
            out.push(HEX[((n >> (i * 4)) & 15) as usize]);
        }
    }

    /// The next id.
    pub fn next(&self) -> String {
        let mut id = Vec::with_capacity(self.prefix.len() + 4);
        self.push_next(&mut id);
        // Made of a valid name, hex digits and '-' only.
        String::from_utf8_lossy(&id).into_owned()
    }
}

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

    #[test]
    fn new_ids_count_in_hex_after_the_name_and_start() {
        let ids = Ids::new("lb1", 0x19a);
        assert_eq!(ids.next(), "lb1-19a-0");
        let mut out = b"x: ".to_vec();
        ids.push_next(&mut out);
        assert_eq!(out, b"x: lb1-19a-1");
        for _ in 2..0x1f {
            ids.next();
        }
        assert_eq!(ids.next(), "lb1-19a-1f");
        assert!(is_valid(ids.next().as_bytes()));
    }
}
