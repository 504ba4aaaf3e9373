//! The files of a platform build (a `paddock` executable): what a platform upgrade checks and
//! keeps, on the controller and on the servers alike.

use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest as _, Sha256};

/// sha256 of the file at `path`, lowercase hex, read in pieces (a `paddock` executable is
/// hundreds of MB).
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let mut hash = Sha256::new();
    std::io::copy(&mut file, &mut hash)?;
    Ok(hex::encode(hash.finalize()))
}

/// Keeps the executable at `exe`, about to be replaced by a platform build, beside it as
/// `<name>.previous` (a hard link: no copy), the way back for an operator: stop the process,
/// move it over, start it. Returns where it is kept.
pub fn keep_previous(exe: &Path) -> std::io::Result<PathBuf> {
    let mut name = exe.file_name().unwrap_or_default().to_os_string();
    name.push(".previous");
    let previous = exe.with_file_name(name);
    match std::fs::remove_file(&previous) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    std::fs::hard_link(exe, &previous)?;
    Ok(previous)
}

/// sha256 of the executable this process runs (`/proc/self/exe`: the file it was started
/// from, even if its path now names another one).
pub fn sha256_of_this_executable() -> std::io::Result<String> {
    sha256_file(Path::new("/proc/self/exe"))
}

/// Why an executable is not a Paddock build that runs here.
#[derive(Debug, thiserror::Error)]
pub enum NotPaddock {
    #[error("could not be made executable: {0}")]
    Permissions(std::io::Error),
    #[error("does not run on this machine ({0})")]
    DoesNotRun(std::io::Error),
    #[error("did not print its version within {} s", .0.as_secs())]
    TimedOut(Duration),
    #[error("printed {said:?} for `--version` (exit {status}), not `paddock VERSION`")]
    Said {
        said: String,
        status: std::process::ExitStatus,
    },
}

/// Makes `path` executable, runs `path --version` (empty environment, at most `timeout`) and
/// reads Paddock's version from what it prints.
pub async fn paddock_version_of(path: &Path, timeout: Duration) -> Result<String, NotPaddock> {
    use std::os::unix::fs::PermissionsExt as _;
    tokio::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
        .await
        .map_err(NotPaddock::Permissions)?;
    let run = tokio::process::Command::new(path)
        .arg("--version")
        .env_clear()
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(timeout, run)
        .await
        .map_err(|_| NotPaddock::TimedOut(timeout))?
        .map_err(NotPaddock::DoesNotRun)?;
    let said = String::from_utf8_lossy(&output.stdout);
    parse_version(&said).ok_or_else(|| NotPaddock::Said {
        said: said.trim().to_string(),
        status: output.status,
    })
}

/// `paddock 0.1.0` → `0.1.0`.
pub fn parse_version(output: &str) -> Option<String> {
    let version = output.trim().strip_prefix("paddock ")?;
    let ok = !version.is_empty()
        && version.len() <= 64
        && version
            .chars()
            .all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, '.' | '-' | '+'));
    ok.then(|| version.to_string())
}

#[cfg(test)]
mod tests {
    use super::parse_version;

    #[test]
    fn versions_are_read_from_paddock_only() {
        assert_eq!(parse_version("paddock 0.1.0\n").as_deref(), Some("0.1.0"));
        assert_eq!(
            parse_version("paddock 1.2.3-rc.1+x").as_deref(),
            Some("1.2.3-rc.1+x")
        );
        assert_eq!(parse_version("nginx 1.22"), None);
        assert_eq!(parse_version("paddock "), None);
        assert_eq!(parse_version("paddock 1.0; rm -rf"), None);
    }
}
