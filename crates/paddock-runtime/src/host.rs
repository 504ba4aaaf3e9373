//! The per-request host state (`T` of `Store<T>`) and the app's stdout/stderr as log lines.

use std::sync::Arc;

use bytes::Bytes;
use wasmtime::ResourceLimiter;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

use crate::AppSpec;
use crate::data::RequestData;

pub struct Host {
    pub(crate) table: ResourceTable,
    wasi: WasiCtx,
    http: WasiHttpCtx,
    pub(crate) limits: MemoryLimit,
    /// The app's name, for its data.
    pub(crate) app: String,
    /// The app's `[config]`, for `wasi:config/store`.
    pub(crate) config: Arc<[(String, String)]>,
    /// What the request may reach of the app's data; `None` on a front-end without a store.
    pub(crate) data: Option<RequestData>,
    /// The last key of each `list-keys` page that had more after it; a cursor is an index here.
    pub(crate) cursors: Vec<String>,
}

impl Host {
    pub(crate) fn new(
        spec: &AppSpec,
        env: &Arc<[(String, String)]>,
        request_id: &Arc<str>,
        data: Option<RequestData>,
    ) -> Host {
        let tags = Arc::new(LogTags {
            app: spec.name.clone(),
            version: spec.version.clone(),
            request_id: request_id.clone(),
        });
        let mut wasi = WasiCtxBuilder::new();
        wasi.stdout(LogStream {
            tags: tags.clone(),
            stream: "stdout",
        })
        .stderr(LogStream {
            tags,
            stream: "stderr",
        })
        .env("PADDOCK_APP", &spec.name)
        .env("PADDOCK_VERSION", &spec.version)
        .env("PADDOCK_REQUEST_ID", &**request_id);
        for (key, value) in env.iter() {
            wasi.env(key, value);
        }
        Host {
            table: ResourceTable::new(),
            wasi: wasi.build(),
            http: WasiHttpCtx::new(),
            limits: MemoryLimit::new(spec.limits.memory_mib as usize * 1024 * 1024),
            app: spec.name.clone(),
            config: env.clone(),
            data,
            cursors: Vec::new(),
        }
    }
}

/// The app's `memory_mib` over all the linear memories of an instance together: a component made
/// of several core modules has one memory each (wasmtime's `StoreLimits` limits each alone, so
/// such an app could use the limit once per memory). Growing past it, or failing to grow, traps.
pub(crate) struct MemoryLimit {
    limit: usize,
    /// Bytes of all memories. A growth that fails after it was granted traps, which ends the
    /// instance and its store, so nothing is ever given back.
    used: usize,
}

impl MemoryLimit {
    pub(crate) fn new(limit: usize) -> MemoryLimit {
        MemoryLimit { limit, used: 0 }
    }
}

impl ResourceLimiter for MemoryLimit {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let more = desired.saturating_sub(current);
        let total = self.used.saturating_add(more);
        if total > self.limit {
            wasmtime::bail!(
                "memory limit: growing memory to {desired} bytes would make {total} bytes in all, over the app's memory_mib ({} MiB)",
                self.limit / (1024 * 1024)
            );
        }
        if maximum.is_some_and(|max| desired > max) {
            wasmtime::bail!("growing memory to {desired} bytes passes its declared maximum");
        }
        self.used = total;
        Ok(true)
    }

    fn memory_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        Err(error.context("growing memory failed"))
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if maximum.is_some_and(|max| desired > max) {
            wasmtime::bail!("growing a table to {desired} elements passes its declared maximum");
        }
        Ok(true)
    }

    fn table_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        Err(error.context("growing a table failed"))
    }
}

impl WasiView for Host {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for Host {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: Default::default(),
        }
    }
}

struct LogTags {
    app: String,
    version: String,
    request_id: Arc<str>,
}

/// An app's stdout or stderr: each line becomes a log event tagged with app, version, request.
struct LogStream {
    tags: Arc<LogTags>,
    stream: &'static str,
}

impl IsTerminal for LogStream {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for LogStream {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(LineLogger::new(self.tags.clone(), self.stream))
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(LineLogger::new(self.tags.clone(), self.stream))
    }
}

/// Longest line kept; the rest of a longer line is dropped (and said so).
const MAX_LINE: usize = 8 * 1024;

struct LineLogger {
    tags: Arc<LogTags>,
    stream: &'static str,
    line: Vec<u8>,
    truncated: bool,
}

impl LineLogger {
    fn new(tags: Arc<LogTags>, stream: &'static str) -> LineLogger {
        LineLogger {
            tags,
            stream,
            line: Vec::new(),
            truncated: false,
        }
    }

    fn push(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let (chunk, end_of_line) = match bytes.iter().position(|&b| b == b'\n') {
                Some(i) => (&bytes[..i], true),
                None => (bytes, false),
            };
            let room = MAX_LINE - self.line.len();
            self.line.extend_from_slice(&chunk[..chunk.len().min(room)]);
            self.truncated |= chunk.len() > room;
            bytes = &bytes[(chunk.len() + usize::from(end_of_line)).min(bytes.len())..];
            if end_of_line {
                self.emit();
            }
        }
    }

    fn emit(&mut self) {
        let text = String::from_utf8_lossy(&self.line);
        let text = text.trim_end_matches('\r');
        let tags = &self.tags;
        tracing::info!(
            target: "paddock::app",
            app = %tags.app,
            version = %tags.version,
            request = %tags.request_id,
            stream = self.stream,
            "{text}{}",
            if self.truncated { " [line truncated]" } else { "" }
        );
        self.line.clear();
        self.truncated = false;
    }
}

impl Drop for LineLogger {
    fn drop(&mut self) {
        if !self.line.is_empty() {
            self.emit();
        }
    }
}

#[async_trait::async_trait]
impl Pollable for LineLogger {
    async fn ready(&mut self) {}
}

impl OutputStream for LineLogger {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.push(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(64 * 1024)
    }
}

impl tokio::io::AsyncWrite for LineLogger {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.push(buf);
        std::task::Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1024 * 1024;

    #[test]
    fn the_memory_limit_counts_every_memory_of_an_instance() {
        let mut limit = MemoryLimit::new(10 * MIB);
        // Two memories at 4 MiB each: 8 MiB in all.
        assert!(limit.memory_growing(0, 4 * MIB, None).unwrap());
        assert!(limit.memory_growing(0, 4 * MIB, None).unwrap());
        // The second grows to 6 MiB: 10 MiB in all, the limit itself.
        assert!(limit.memory_growing(4 * MIB, 6 * MIB, None).unwrap());
        // The first grows by one more page: over, though it alone is at 4 MiB of 10.
        let e = limit
            .memory_growing(4 * MIB, 4 * MIB + 65536, None)
            .unwrap_err();
        assert!(
            e.to_string().contains("over the app's memory_mib (10 MiB)"),
            "{e}"
        );
    }

    #[test]
    fn a_growth_past_a_declared_maximum_or_that_fails_traps() {
        let mut limit = MemoryLimit::new(10 * MIB);
        assert!(limit.memory_growing(0, MIB / 2, Some(MIB / 4)).is_err());
        assert!(
            limit
                .memory_grow_failed(wasmtime::Error::msg("mmap"))
                .is_err()
        );
    }
}
