//! One request on a fresh instance: instantiate from the `ProxyPre`, call the incoming handler,
//! hand back the response as soon as the app sets it, enforce the app's limits throughout.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use tokio::time::Instant;
use wasmtime::{PoolConcurrencyLimitError, Store, Trap, UpdateDeadline};
use wasmtime_wasi_http::WasiHttpView;
use wasmtime_wasi_http::p2::bindings::http::types::{ErrorCode, Scheme};
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;

use crate::data::RequestData;
use crate::host::Host;
use crate::{AppVersion, Runtime};

/// The body of an app's response, streamed while the instance still runs. When the instance
/// fails (a trap, the time limit) before finishing the body, the body ends with an error rather
/// than quietly, so that a client never takes a cut-off body for a whole one: HTTP/1.1 clients
/// see the connection close before the last chunk.
pub struct ResponseBody {
    inner: HyperOutgoingBody,
    /// Set by the instance's task when it fails, before the instance (and with it the sending
    /// end of `inner`) is dropped; so it is set whenever `inner` ends because of that failure.
    failed: Arc<AtomicBool>,
}

impl http_body::Body for ResponseBody {
    type Data = Bytes;
    type Error = wasmtime_wasi_http::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match ready!(Pin::new(&mut self.inner).poll_frame(cx)) {
            None if self.failed.load(Ordering::Acquire) => {
                Poll::Ready(Some(Err(wasmtime_wasi_http::Error::InternalError(Some(
                    "the app failed before finishing its response body".into(),
                )))))
            }
            frame => Poll::Ready(frame),
        }
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Why a request got no response from the app. Each is logged once, by the runtime, with app,
/// version and request; the caller only turns it into a status code.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The app trapped (panic, out of memory, unreachable, ...) before responding: 500.
    #[error("the app failed while handling the request")]
    Trap,
    /// The request ran past the app's time limit: 504.
    #[error("the app did not answer within its time limit")]
    Timeout,
    /// Every instance slot is taken: 503, try again.
    #[error("the server is at its instance limit")]
    Busy,
    /// The app returned without setting a response, or set an error: 500.
    #[error("the app sent no response")]
    NoResponse,
    /// The request could not be handed to the app (e.g. a malformed header): 400.
    #[error("the request could not be passed to the app")]
    BadRequest,
    /// The request's body is larger than the app takes (`[limits] request_body_mib`): 413.
    /// Its text is for the app's users; the front-end's log names the setting.
    #[error(
        "the request body is larger than this app takes ({limit_mib} MiB at most); send a smaller one"
    )]
    BodyTooLarge { limit_mib: u32 },
}

impl ServeError {
    pub fn status(&self) -> http::StatusCode {
        use http::StatusCode as S;
        match self {
            ServeError::Trap | ServeError::NoResponse => S::INTERNAL_SERVER_ERROR,
            ServeError::Timeout => S::GATEWAY_TIMEOUT,
            ServeError::Busy => S::SERVICE_UNAVAILABLE,
            ServeError::BadRequest => S::BAD_REQUEST,
            ServeError::BodyTooLarge { .. } => S::PAYLOAD_TOO_LARGE,
        }
    }
}

impl Runtime {
    /// Serves `request` on a fresh instance of `app`. Returns once the app has set its response
    /// head; the body streams from a task that keeps running the instance (and holds `app`) until
    /// the body is done or the app's time limit passes. `data` is what the request may reach of
    /// the app's data (`wasi:keyvalue`); without it, opening a bucket fails with a message that
    /// says so.
    ///
    /// A body larger than the app's `request_body_mib` is refused: before the app runs when its
    /// `Content-Length` says so, else when the app reads past the limit (the app's read fails;
    /// if its head had not gone out yet, the request gets [`ServeError::BodyTooLarge`], else the
    /// answer it started goes on, with what the app makes of the failed read).
    pub async fn serve<B>(
        &self,
        app: &Arc<AppVersion>,
        request: hyper::Request<B>,
        request_id: &str,
        data: Option<RequestData>,
    ) -> Result<hyper::Response<ResponseBody>, ServeError>
    where
        B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<wasmtime_wasi_http::Error>,
    {
        let spec = &app.spec;
        let too_large = ServeError::BodyTooLarge {
            limit_mib: spec.limits.request_body_mib,
        };
        let limit = spec.limits.request_body_bytes();
        let declared = request
            .headers()
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if declared.is_some_and(|length| length > limit) {
            tracing::debug!(
                app = %spec.name,
                request = request_id,
                "request body refused: over the app's `request_body_mib` ({} MiB, [limits] in its paddock.toml)",
                spec.limits.request_body_mib
            );
            return Err(too_large);
        }
        // Set once the app reads past the limit: the request is then answered 413, and its
        // failure is not the app's.
        let over = Arc::new(AtomicBool::new(false));
        let request = request.map({
            let over = over.clone();
            move |inner| LimitedBody {
                inner,
                left: limit,
                limit,
                over,
            }
        });
        let deadline = Instant::now() + spec.limits.request_timeout;
        let method = request.method().clone();
        // Kept for the failure logs; cloning a `Uri` shares its bytes, no allocation.
        let uri = request.uri().clone();
        let request_id: Arc<str> = Arc::from(request_id);
        let log_failure = {
            let app = app.clone();
            let request_id = request_id.clone();
            let over = over.clone();
            let (method, uri) = (method.clone(), uri.clone());
            move |what: &str, error: &dyn std::fmt::Display| {
                let spec = &app.spec;
                if over.load(Ordering::Acquire) {
                    tracing::debug!(request = %request_id, "{what} after the body went over its limit: {error}");
                    return;
                }
                tracing::warn!(
                    app = %spec.name,
                    version = %spec.version,
                    request = %request_id,
                    %method,
                    path = %uri.path(),
                    "{what}: {error}"
                );
            }
        };

        let mut store = Store::new(&self.engine, Host::new(spec, &app.env, &request_id, data));
        store.limiter(|host| &mut host.limits);
        // Every tick the instance yields its thread, so a busy loop never starves other requests;
        // once the deadline has passed, the next tick interrupts it. The yield goes through
        // `tokio::task::yield_now`, which lets the worker poll its sockets before running the
        // instance again (a plain self-wake would keep the I/O driver waiting for dozens of slices).
        let std_deadline = deadline.into_std();
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(move |_| {
            if std::time::Instant::now() >= std_deadline {
                Ok(UpdateDeadline::Interrupt)
            } else {
                Ok(UpdateDeadline::YieldCustom(
                    1,
                    Box::pin(tokio::task::yield_now()),
                ))
            }
        });

        let (sender, receiver) = tokio::sync::oneshot::channel();
        let handles = (|| -> wasmtime::Result<_> {
            let req = store
                .data_mut()
                .http()
                .new_incoming_request(Scheme::Http, request)?;
            // The head going out ends the time in which a session can start: marked before the
            // app runs on (see `data::Session`).
            let session = store
                .data()
                .data
                .as_ref()
                .and_then(|data| data.session.clone());
            let out = store
                .data_mut()
                .http()
                .new_response_outparam_from_callback(move |response| {
                    if let Some(session) = session {
                        session.mark_head_sent();
                    }
                    let _ = sender.send(response);
                })?;
            Ok((req, out))
        })();
        let (req, out) = match handles {
            Ok(handles) => handles,
            Err(e) => {
                log_failure("request refused", &format!("{:#}", anyhow::Error::from(e)));
                return Err(ServeError::BadRequest);
            }
        };

        let pre = app.pre.clone();
        let app_alive = app.clone();
        let log_in_task = log_failure.clone();
        let failed = Arc::new(AtomicBool::new(false));
        let failed_in_task = failed.clone();
        let request_in_task = request_id.clone();
        let task = tokio::spawn(async move {
            let _app = app_alive;
            let run = async {
                let proxy = pre.instantiate_async(&mut store).await?;
                proxy
                    .wasi_http_incoming_handler()
                    .call_handle(&mut store, req, out)
                    .await
            };
            let outcome = match tokio::time::timeout_at(deadline, run).await {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(e)) => classify(anyhow::Error::from(e)),
                Err(_elapsed) => (
                    ServeError::Timeout,
                    anyhow::anyhow!("time limit exceeded while waiting"),
                ),
            };
            let what = match outcome.0 {
                ServeError::Timeout => "request timed out",
                ServeError::Busy => "no instance slot free",
                _ => "app trapped",
            };
            // The cause in one line for the operator; the wasm backtrace at debug level.
            log_in_task(what, &outcome.1.root_cause());
            tracing::debug!(request = %request_in_task, "{what}: {:?}", outcome.1);
            // Before the store (and the body's sending end) goes: see `ResponseBody::failed`.
            failed_in_task.store(true, Ordering::Release);
            Err(outcome.0)
        });

        let served = match receiver.await {
            Ok(Ok(response)) => Ok(response.map(|inner| ResponseBody { inner, failed })),
            Ok(Err(code)) => {
                log_failure("app answered with an error", &error_code_message(&code));
                Err(ServeError::NoResponse)
            }
            // The outparam was dropped unset: the task has ended, and says why.
            Err(_) => match task.await {
                Ok(Ok(())) => {
                    log_failure("no response", &"the app returned without setting one");
                    Err(ServeError::NoResponse)
                }
                Ok(Err(e)) => Err(e),
                Err(join) => {
                    tracing::error!(
                        app = %spec.name,
                        version = %spec.version,
                        request = %request_id,
                        %method,
                        path = %uri.path(),
                        "request task failed: {join}"
                    );
                    Err(ServeError::Trap)
                }
            },
        };
        if over.load(Ordering::Acquire) {
            return Err(too_large);
        }
        served
    }
}

/// A request body that fails once more than `limit` bytes came: the app's read then fails with
/// `HTTP-request-body-size`, and `over` says so.
struct LimitedBody<B> {
    inner: B,
    left: u64,
    limit: u64,
    over: Arc<AtomicBool>,
}

impl<B> http_body::Body for LimitedBody<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: Into<wasmtime_wasi_http::Error>,
{
    type Data = Bytes;
    type Error = wasmtime_wasi_http::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match ready!(Pin::new(&mut self.inner).poll_frame(cx)) {
            Some(Ok(frame)) => {
                let size = frame.data_ref().map_or(0, |d| d.len() as u64);
                if size > self.left {
                    self.over.store(true, Ordering::Release);
                    let limit = self.limit;
                    return Poll::Ready(Some(Err(wasmtime_wasi_http::Error::HttpRequestBodySize(
                        Some(limit),
                    ))));
                }
                self.left -= size;
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(e)) => Poll::Ready(Some(Err(e.into()))),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

fn classify(error: anyhow::Error) -> (ServeError, anyhow::Error) {
    if error.chain().any(|e| e.is::<PoolConcurrencyLimitError>()) {
        return (ServeError::Busy, error);
    }
    let interrupted = error
        .chain()
        .any(|e| matches!(e.downcast_ref::<Trap>(), Some(Trap::Interrupt)))
        || matches!(error.downcast_ref::<Trap>(), Some(Trap::Interrupt));
    if interrupted {
        (ServeError::Timeout, error)
    } else {
        (ServeError::Trap, error)
    }
}

fn error_code_message(code: &ErrorCode) -> String {
    format!("{code:?}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt as _;

    /// A body that arrives in pieces, as a chunked upload does.
    struct Pieces(std::collections::VecDeque<usize>);

    impl http_body::Body for Pieces {
        type Data = Bytes;
        type Error = hyper::Error;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
            Poll::Ready(
                self.0
                    .pop_front()
                    .map(|n| Ok(Frame::data(Bytes::from(vec![b'x'; n])))),
            )
        }
    }

    fn limited(sizes: &[usize], limit: u64) -> (LimitedBody<Pieces>, Arc<AtomicBool>) {
        let over = Arc::new(AtomicBool::new(false));
        let body = LimitedBody {
            inner: Pieces(sizes.iter().copied().collect()),
            left: limit,
            limit,
            over: over.clone(),
        };
        (body, over)
    }

    #[tokio::test]
    async fn a_body_read_past_the_limit_fails_and_says_so() {
        let (body, over) = limited(&[4, 4, 2], 10);
        assert_eq!(body.collect().await.unwrap().to_bytes().len(), 10);
        assert!(!over.load(Ordering::Acquire));

        let (mut body, over) = limited(&[4, 4, 3], 10);
        let mut read = 0;
        let error = loop {
            match body.frame().await {
                Some(Ok(frame)) => read += frame.into_data().unwrap().len(),
                Some(Err(e)) => break e,
                None => panic!("the body ended without an error"),
            }
        };
        assert_eq!(read, 8);
        assert!(
            matches!(
                error,
                wasmtime_wasi_http::Error::HttpRequestBodySize(Some(10))
            ),
            "{error:?}"
        );
        assert!(over.load(Ordering::Acquire));
    }
}
