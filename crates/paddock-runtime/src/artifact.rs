//! Ahead-of-time artifacts: a component compiled to native code for one engine.
//!
//! The format is a short text header followed by wasmtime's serialized component:
//!
//! ```text
//! paddock-artifact 1
//! engine 3f2a…            (Runtime::engine_hash of the engine that compiled it)
//! component 9c1e…         (sha256 of the component it was compiled from)
//! payload 55d0…           (sha256 of the bytes after the blank line)
//!
//! <wasmtime serialized component>
//! ```
//!
//! The header is checked before the payload is handed to wasmtime: a mismatch is a clear
//! [`LoadError`](crate::LoadError), never undefined behaviour.

use crate::{LoadError, sha256_hex};

const MAGIC: &str = "paddock-artifact 1";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArtifactHeader {
    pub engine: String,
    pub component_sha256: String,
    pub payload_sha256: String,
}

/// An artifact in memory: header and payload, as stored on disk and shipped between servers.
#[derive(Debug, Clone)]
pub struct Artifact {
    pub header: ArtifactHeader,
    bytes: Vec<u8>,
    payload_start: usize,
}

impl Artifact {
    pub(crate) fn new(header: ArtifactHeader, payload: Vec<u8>) -> Artifact {
        let head = format!(
            "{MAGIC}\nengine {}\ncomponent {}\npayload {}\n\n",
            header.engine, header.component_sha256, header.payload_sha256
        );
        let mut bytes = head.into_bytes();
        let payload_start = bytes.len();
        bytes.extend_from_slice(&payload);
        Artifact {
            header,
            bytes,
            payload_start,
        }
    }

    /// Reads the header of an artifact's bytes (the payload is checked by [`Artifact::verify`]).
    pub fn parse(bytes: &[u8]) -> Result<Artifact, LoadError> {
        let damaged = |why: &str| LoadError::ArtifactDamaged(why.to_string());
        let head_len = bytes
            .windows(2)
            .take(1024)
            .position(|w| w == b"\n\n")
            .ok_or_else(|| damaged("no paddock-artifact header"))?;
        let head =
            std::str::from_utf8(&bytes[..head_len]).map_err(|_| damaged("header is not text"))?;
        let mut lines = head.lines();
        if lines.next() != Some(MAGIC) {
            return Err(damaged("not a paddock-artifact 1 file"));
        }
        let mut field = |key: &str| {
            lines
                .next()
                .and_then(|l| l.strip_prefix(key))
                .and_then(|v| v.strip_prefix(' '))
                .map(str::to_string)
                .ok_or_else(|| damaged(&format!("header has no `{key}` line")))
        };
        let header = ArtifactHeader {
            engine: field("engine")?,
            component_sha256: field("component")?,
            payload_sha256: field("payload")?,
        };
        Ok(Artifact {
            header,
            bytes: bytes.to_vec(),
            payload_start: head_len + 2,
        })
    }

    /// Checks the payload against the sha256 recorded in the header.
    pub fn verify(&self) -> Result<(), LoadError> {
        let actual = sha256_hex(self.payload());
        if actual != self.header.payload_sha256 {
            return Err(LoadError::ArtifactDamaged(format!(
                "payload sha256 is {actual}, header says {}",
                self.header.payload_sha256
            )));
        }
        Ok(())
    }

    pub fn payload(&self) -> &[u8] {
        &self.bytes[self.payload_start..]
    }

    /// The whole artifact, header included, as written to disk.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Artifact {
        let payload = b"native code".to_vec();
        Artifact::new(
            ArtifactHeader {
                engine: "e1".into(),
                component_sha256: "c1".into(),
                payload_sha256: sha256_hex(&payload),
            },
            payload,
        )
    }

    #[test]
    fn round_trips() {
        let a = sample();
        let b = Artifact::parse(a.as_bytes()).unwrap();
        assert_eq!(a.header, b.header);
        assert_eq!(b.payload(), b"native code");
        b.verify().unwrap();
    }

    #[test]
    fn a_flipped_payload_byte_is_caught() {
        let mut bytes = sample().as_bytes().to_vec();
        *bytes.last_mut().unwrap() ^= 1;
        let err = Artifact::parse(&bytes).unwrap().verify().unwrap_err();
        assert!(err.to_string().contains("payload sha256"), "{err}");
    }

    #[test]
    fn garbage_is_refused() {
        for bytes in [&b""[..], b"\0asm\x0d\0\x01\0", b"paddock-artifact 2\n\n"] {
            assert!(matches!(
                Artifact::parse(bytes),
                Err(LoadError::ArtifactDamaged(_))
            ));
        }
    }
}
