//! The front-end's local artifact cache: `<dir>/<engine hash>/<component sha256>.cwasm`.
//!
//! A cached artifact that fails its checks is a cache miss: it is compiled (or fetched) again and
//! overwritten, never trusted.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use paddock_runtime::{AppSpec, AppVersion, LoadError, Runtime};

#[derive(Clone)]
pub struct ArtifactCache {
    dir: PathBuf,
    runtime: Arc<Runtime>,
}

impl ArtifactCache {
    pub fn open(root: &Path, runtime: Arc<Runtime>) -> anyhow::Result<ArtifactCache> {
        let dir = root.join(runtime.engine_hash());
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(ArtifactCache { dir, runtime })
    }

    /// The cache file of a component. Only ever called with a checked sha256 (see
    /// `Deployer::load`); anything else would name a file outside the cache.
    fn path_of(&self, component_sha256: &str) -> PathBuf {
        debug_assert!(paddock_core::is_sha256(component_sha256));
        self.dir.join(format!("{component_sha256}.cwasm"))
    }

    /// Loads `component` (whose sha256 is `spec.component_sha256`) as app version `spec`, from the cache when its artifact is there and
    /// sound, else by compiling it and caching the result. Blocking: call off the async threads.
    pub fn load_component(
        &self,
        spec: AppSpec,
        component: &[u8],
    ) -> Result<Arc<AppVersion>, LoadError> {
        let path = self.path_of(&spec.component_sha256);
        if let Ok(bytes) = std::fs::read(&path) {
            match self.runtime.load(spec.clone(), &bytes) {
                Ok(version) => return Ok(version),
                Err(e) => tracing::warn!(
                    path = %path.display(),
                    "cached artifact not usable, compiling again: {e}"
                ),
            }
        }
        let artifact = self.runtime.compile(component)?;
        if let Err(e) = write_atomically(&path, artifact.as_bytes()) {
            tracing::warn!(path = %path.display(), "could not cache the artifact: {e:#}");
        }
        self.runtime.load(spec, artifact.as_bytes())
    }
}

impl ArtifactCache {
    /// The app version from the cached artifact, if there is one and it is sound. Blocking.
    pub fn load_cached(&self, spec: AppSpec) -> Option<Arc<AppVersion>> {
        let path = self.path_of(&spec.component_sha256);
        let bytes = std::fs::read(&path).ok()?;
        match self.runtime.load(spec, &bytes) {
            Ok(version) => Some(version),
            Err(e) => {
                tracing::warn!(path = %path.display(), "cached artifact not usable: {e}");
                None
            }
        }
    }

    /// Loads an artifact received from the controller and, once it has loaded, caches it. Blocking.
    pub fn load_artifact(&self, spec: AppSpec, bytes: &[u8]) -> Result<Arc<AppVersion>, LoadError> {
        let path = self.path_of(&spec.component_sha256);
        let version = self.runtime.load(spec, bytes)?;
        if let Err(e) = write_atomically(&path, bytes) {
            tracing::warn!(path = %path.display(), "could not cache the artifact: {e:#}");
        }
        Ok(version)
    }
}

/// Replaces `path` with `bytes` durably: a crash or a power loss leaves the old file or the new
/// one, whole (the new one written to a temporary file, flushed, renamed over it, the directory
/// flushed).
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut file = atomic_write_file::AtomicWriteFile::open(path)
        .with_context(|| format!("creating a file beside {}", path.display()))?;
    file.write_all(bytes)
        .and_then(|()| file.commit())
        .with_context(|| format!("writing {}", path.display()))
}
