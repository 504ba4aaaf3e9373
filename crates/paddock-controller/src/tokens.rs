//! The admin token (for people and the CLI) and the join token (for front-ends), generated at the
//! first start in the data folder (`admin.token`, `join.token`, mode 0600) and printed once.

use std::path::Path;

use anyhow::Context as _;

#[derive(Clone)]
pub struct Tokens {
    pub admin: String,
    pub join: String,
}

impl Tokens {
    pub fn load_or_create(dir: &Path) -> anyhow::Result<Tokens> {
        let (admin, new_admin) = load_or_create_one(&dir.join("admin.token"))?;
        let (join, new_join) = load_or_create_one(&dir.join("join.token"))?;
        if new_admin || new_join {
            // Printed once, on the first start; afterwards they are in the data folder only.
            println!("admin token: {admin}");
            println!("join token:  {join}");
            println!("(kept in {})", dir.display());
        }
        Ok(Tokens { admin, join })
    }
}

fn load_or_create_one(path: &Path) -> anyhow::Result<(String, bool)> {
    match std::fs::read_to_string(path) {
        Ok(token) if !token.trim().is_empty() => return Ok((token.trim().to_string(), false)),
        Ok(_) => anyhow::bail!("{} is empty; delete it to get a new token", path.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    }
    let mut bytes = [0u8; 24];
    getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("no randomness for a token: {e}"))?;
    let token = hex::encode(bytes);
    {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        // Durably, readable by this user only.
        let mut file = atomic_write_file::AtomicWriteFile::options()
            .mode(0o600)
            .open(path)
            .with_context(|| format!("creating a file beside {}", path.display()))?;
        writeln!(file, "{token}")
            .and_then(|()| file.commit())
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok((token, true))
}

/// Compares two tokens in time independent of where they differ.
pub fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn tokens_are_made_once_readable_by_their_user_only() {
        let dir = tempfile::tempdir().unwrap();
        let first = Tokens::load_or_create(dir.path()).unwrap();
        assert_ne!(first.admin, first.join);
        for name in ["admin.token", "join.token"] {
            let mode = std::fs::metadata(dir.path().join(name))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{name}");
        }
        let again = Tokens::load_or_create(dir.path()).unwrap();
        assert_eq!((again.admin, again.join), (first.admin, first.join));
        // Nothing but the two tokens is left in the folder.
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["admin.token", "join.token"]);
    }
}
