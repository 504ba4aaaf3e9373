//! Paddock's WebAssembly host: the one crate that knows wasmtime.
//!
//! A [`Runtime`] owns the engine (pooling allocator, epoch interruption), compiles `wasi:http/proxy`
//! components ahead of time into [`artifact`]s, loads an artifact into an [`AppVersion`] (a
//! pre-instantiated component plus its limits), and [`Runtime::serve`]s one HTTP request on a fresh
//! instance of an `AppVersion`.
//!
//! The host side: `wasi:http` (incoming handler, outgoing requests), and the rest of WASI as
//! `wasmtime serve -Scli` gives it (environment, stdio, exit, clocks, random), with no files and no
//! sockets granted. An app's stdout and stderr become log lines tagged with app, version and
//! request.
//!
//! Deliberately absent: routing, versions swapping, HTTP serving, health — the front-end does those
//! with the `Arc<AppVersion>` values this crate hands out.

pub mod artifact;
pub mod build;
mod config;
pub mod data;
mod host;
mod serve;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sha2::{Digest, Sha256};
use wasmtime::component::{Component, Linker};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};
use wasmtime_wasi_http::p2::bindings::ProxyPre;

pub use artifact::{Artifact, ArtifactHeader};
pub use data::{AppData, RequestData, Session};
use host::Host;
pub use paddock_core::Limits;
pub use serve::{ResponseBody, ServeError};

/// How often the engine's epoch advances: the granularity of request timeouts, and how often a
/// busy instance yields its thread to other requests.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// Sizing of the engine's instance pool.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// App instances alive at once across all apps: at most this many requests run concurrently;
    /// the next one is answered 503 until an instance is freed.
    pub max_instances: u32,
    /// Largest linear memory any app may be given, in MiB (the pool's slot size).
    pub max_memory_mib: u32,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            max_instances: 1000,
            max_memory_mib: paddock_core::manifest::MAX_MEMORY_MIB,
        }
    }
}

/// Why a component or an artifact was refused. Nothing is loaded when one of these is returned.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(
        "not a valid WebAssembly component ({0}); build it for wasm32-wasip2 or with `wasm-tools component new`"
    )]
    InvalidComponent(String),
    #[error(
        "the component is not a wasi:http/proxy app ({0}); it must export wasi:http/incoming-handler@0.2"
    )]
    NotAnHttpApp(String),
    #[error(
        "the component imports what Paddock does not provide ({0}); apps may import wasi:http, wasi:cli, wasi:clocks, wasi:random, wasi:io"
    )]
    UnsupportedImports(String),
    #[error("artifact is damaged ({0}); fetch or compile it again")]
    ArtifactDamaged(String),
    #[error(
        "artifact was compiled for engine {artifact}, this server's engine is {engine}; compile the component again with this Paddock release"
    )]
    EngineMismatch { artifact: String, engine: String },
    #[error(
        "artifact is of component sha256 {artifact}, expected {expected}; it belongs to another app version"
    )]
    ComponentMismatch { artifact: String, expected: String },
}

/// The name, version and limits of an app version: what the runtime needs to know beside its code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppSpec {
    pub name: String,
    pub version: String,
    pub route: String,
    pub component_sha256: String,
    pub limits: Limits,
    /// The manifest's `[config]`: environment variables of every instance.
    pub config: BTreeMap<String, String>,
}

/// A loaded app version: compiled, linked and pre-instantiated, ready to serve requests on fresh
/// instances. Cheap to share (`Arc`); the code is freed when the last request holding it ends.
pub struct AppVersion {
    spec: AppSpec,
    pre: ProxyPre<Host>,
    /// The `[config]` entries every instance gets, as environment variables and through
    /// `wasi:config/store`: those whose keys the manifest allows (a version stored before that
    /// check may hold others, which never shadow Paddock's own variables). Chosen once here,
    /// not per request, and shared by every request's host.
    env: Arc<[(String, String)]>,
    /// Unique among the versions this process has loaded (a `[config]` change included): what
    /// a response cached for this version is keyed by.
    serial: u64,
}

/// The next [`AppVersion::serial`].
fn next_serial() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

impl AppVersion {
    pub fn spec(&self) -> &AppSpec {
        &self.spec
    }

    pub fn serial(&self) -> u64 {
        self.serial
    }

    /// The same code with another `[config]`: nothing is read, compiled or instantiated
    /// again (the `ProxyPre` is shared). `None` when `config` is the only thing `spec` may
    /// change and it changes something else.
    pub fn with_config(&self, spec: AppSpec) -> Option<Arc<AppVersion>> {
        let same_code = AppSpec {
            config: self.spec.config.clone(),
            ..spec.clone()
        } == self.spec;
        same_code.then(|| {
            Arc::new(AppVersion {
                env: allowed_env(&spec),
                spec,
                pre: self.pre.clone(),
                serial: next_serial(),
            })
        })
    }
}

/// The `[config]` entries every instance gets: those whose keys the manifest allows.
fn allowed_env(spec: &AppSpec) -> Arc<[(String, String)]> {
    spec.config
        .iter()
        .filter(|(key, _)| paddock_core::manifest::is_config_key(key))
        .map(|(key, value)| (key.clone(), value.clone()))
        .collect()
}

impl std::fmt::Debug for AppVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppVersion")
            .field("spec", &self.spec)
            .finish()
    }
}

/// The engine and its linker. One per process.
pub struct Runtime {
    engine: Engine,
    linker: Linker<Host>,
    engine_hash: String,
    ticker_stop: Arc<AtomicBool>,
}

impl Runtime {
    pub fn new(config: &RuntimeConfig) -> anyhow::Result<Runtime> {
        let instances = config.max_instances.max(1);
        let mut pool = PoolingAllocationConfig::new();
        // A component built by Rust's wasm32-wasip2 has a handful of core instances, one or two
        // memories and a few tables; size the pool so that `instances` of them fit at once.
        pool.total_component_instances(instances)
            .total_core_instances(instances.saturating_mul(8))
            .total_memories(instances.saturating_mul(2))
            .total_tables(instances.saturating_mul(8))
            .total_stacks(instances)
            .max_memory_size(config.max_memory_mib as usize * 1024 * 1024)
            // Keep a little of each freed slot resident: the next instance of the same app
            // starts without page faults, while idle memory stays bounded.
            .linear_memory_keep_resident(1 << 20)
            .table_keep_resident(64 << 10)
            .max_unused_warm_slots(instances.min(100));

        let mut wasm = Config::new();
        wasm.wasm_component_model(true)
            .epoch_interruption(true)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&wasm)
            .map_err(anyhow::Error::from)
            .map_err(|e| e.context("creating the WebAssembly engine"))?;

        let mut linker = Linker::<Host>::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker).map_err(anyhow::Error::from)?;
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)
            .map_err(anyhow::Error::from)?;
        data::add_to_linker(&mut linker)?;
        config::add_to_linker(&mut linker)?;

        let engine_hash = engine_hash(&engine);
        let ticker_stop = Arc::new(AtomicBool::new(false));
        {
            let engine = engine.clone();
            let stop = ticker_stop.clone();
            std::thread::Builder::new()
                .name("paddock-epoch".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(EPOCH_TICK);
                        engine.increment_epoch();
                    }
                })?;
        }
        Ok(Runtime {
            engine,
            linker,
            engine_hash,
            ticker_stop,
        })
    }

    /// Identifies what native code this engine can load: artifacts are kept and looked up under it.
    pub fn engine_hash(&self) -> &str {
        &self.engine_hash
    }

    /// Compiles a component to an artifact for this engine, after checking that it is a
    /// `wasi:http/proxy` component whose imports Paddock provides.
    pub fn compile(&self, component: &[u8]) -> Result<Artifact, LoadError> {
        let component_sha256 = sha256_hex(component);
        let payload = self
            .engine
            .precompile_component(component)
            .map_err(|e| LoadError::InvalidComponent(format!("{:#}", anyhow::Error::from(e))))?;
        let artifact = Artifact::new(
            ArtifactHeader {
                engine: self.engine_hash.clone(),
                component_sha256,
                payload_sha256: sha256_hex(&payload),
            },
            payload,
        );
        // Prove the artifact loads and links before anyone stores or ships it.
        self.link(&artifact)?;
        Ok(artifact)
    }

    /// Loads an artifact as a ready-to-serve app version. Checks, before any native code is
    /// touched, that it was made by this engine, for the expected component, and is intact.
    pub fn load(&self, spec: AppSpec, artifact_bytes: &[u8]) -> Result<Arc<AppVersion>, LoadError> {
        let artifact = Artifact::parse(artifact_bytes)?;
        if artifact.header.component_sha256 != spec.component_sha256 {
            return Err(LoadError::ComponentMismatch {
                artifact: artifact.header.component_sha256.clone(),
                expected: spec.component_sha256.clone(),
            });
        }
        let pre = self.link(&artifact)?;
        let env = allowed_env(&spec);
        Ok(Arc::new(AppVersion {
            spec,
            pre,
            env,
            serial: next_serial(),
        }))
    }

    fn link(&self, artifact: &Artifact) -> Result<ProxyPre<Host>, LoadError> {
        if artifact.header.engine != self.engine_hash {
            return Err(LoadError::EngineMismatch {
                artifact: artifact.header.engine.clone(),
                engine: self.engine_hash.clone(),
            });
        }
        artifact.verify()?;
        // SAFETY: `Component::deserialize` runs the native code it is given. The bytes come from
        // `Runtime::compile` of this engine configuration, either just now or through the farm's
        // own controller; `verify` has checked them against the sha256 recorded when they were
        // made, and the engine hash above against this engine. See ARCHITECTURE.md, "Artifacts".
        let component = unsafe { Component::deserialize(&self.engine, artifact.payload()) }
            .map_err(|e| LoadError::ArtifactDamaged(format!("{:#}", anyhow::Error::from(e))))?;
        let instance_pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(|e| LoadError::UnsupportedImports(format!("{:#}", anyhow::Error::from(e))))?;
        ProxyPre::new(instance_pre)
            .map_err(|e| LoadError::NotAnHttpApp(format!("{:#}", anyhow::Error::from(e))))
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.ticker_stop.store(true, Ordering::Relaxed);
    }
}

pub use build::{keep_previous, sha256_file, sha256_of_this_executable};

/// sha256 of `bytes`, lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// A stable name for `Engine::precompile_compatibility_hash`: sha256 over what it hashes, first
/// 16 hex digits. Stable across processes and builds of the same Paddock release.
fn engine_hash(engine: &Engine) -> String {
    use std::hash::{Hash, Hasher};
    struct Sha(Sha256);
    impl Hasher for Sha {
        fn finish(&self) -> u64 {
            0
        }
        fn write(&mut self, bytes: &[u8]) {
            self.0.update(bytes);
        }
    }
    let mut hasher = Sha(Sha256::new());
    engine.precompile_compatibility_hash().hash(&mut hasher);
    hex::encode(&hasher.0.finalize()[..8])
}
