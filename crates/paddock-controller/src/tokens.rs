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
    let tmp = path.with_extension("tmp");
    {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("creating {}", tmp.display()))?;
        writeln!(file, "{token}")?;
    }
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
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
