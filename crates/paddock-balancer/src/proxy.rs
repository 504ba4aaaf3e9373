//! One client request: check it, route it by path prefix, pick a front-end of the app's zone,
//! forward it on a pooled keep-alive connection, retry on another front-end when the first one
//! failed before answering, and relay the response.
//!
//! Retries: a request that was never written (connect failure, a pooled connection found closed)
//! is retried whatever its method; a request that was written and got no response byte is
//! retried only when it is idempotent and has no body. A front-end that fails that way is marked
//! down at once (passive health); active checks bring it back.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{Either, Empty, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use paddock_core::route::RESERVED_PREFIX;

use crate::Shared;
use crate::metrics::RequestLabels;
use crate::upstream::{Conn, InFlight};

/// What the balancer sends to a front-end: the client's body, or nothing (replayable).
pub type UpBody = Either<Incoming, Empty<Bytes>>;

/// Settings of the request path.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// Longest a front-end may take to start its response.
    pub response_timeout: Duration,
}

pub async fn handle(
    request: Request<Incoming>,
    shared: Arc<Shared>,
    peer_ip: HeaderValue,
    suspect: Arc<AtomicBool>,
) -> Result<Response<ProxyBody>, Infallible> {
    let started = Instant::now();
    if suspect.load(Ordering::Acquire) {
        return Ok(refuse(
            &shared,
            started,
            "",
            StatusCode::BAD_REQUEST,
            "ambiguous request framing: Content-Length together with Transfer-Encoding, or Content-Length twice; send exactly one of them",
        ));
    }
    let host = match check_host(&request) {
        Ok(host) => host,
        Err(message) => {
            return Ok(refuse(
                &shared,
                started,
                "",
                StatusCode::BAD_REQUEST,
                message,
            ));
        }
    };
    let path = request.uri().path();
    if path.starts_with(RESERVED_PREFIX) || path == RESERVED_PREFIX.trim_end_matches('/') {
        return Ok(answer(
            &shared,
            started,
            "",
            StatusCode::NOT_FOUND,
            format!("{path}: {RESERVED_PREFIX} belongs to the platform and is not routed to apps"),
        ));
    }
    let table = shared.table.load_full();
    if table.generation == 0 {
        return Ok(answer(
            &shared,
            started,
            "",
            StatusCode::SERVICE_UNAVAILABLE,
            "this balancer has no routing table yet: the controller has not answered; its log says why".into(),
        ));
    }
    let Some(route) = table.route(path) else {
        return Ok(answer(
            &shared,
            started,
            "",
            StatusCode::NOT_FOUND,
            format!(
                "no app is routed at {path}; `paddock app list` shows the apps and their routes"
            ),
        ));
    };
    let app = route.app.clone();
    let mut zone_index = route.zone;
    let mut table = table;
    if let Some(refusal) = check_transfer_encoding(request.headers()) {
        return Ok(refuse(
            &shared,
            started,
            &app,
            StatusCode::NOT_IMPLEMENTED,
            refusal,
        ));
    }

    let (mut parts, body) = request.into_parts();
    let bodyless = is_bodyless(&parts.headers);
    let idempotent = matches!(
        parts.method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    );
    prepare_headers(&mut parts.headers, &peer_ip, host);
    parts.uri = origin_form(&parts.uri);
    parts.version = Version::HTTP_11;
    let replay = bodyless.then(|| {
        (
            parts.method.clone(),
            parts.uri.clone(),
            parts.headers.clone(),
        )
    });
    let mut pending = Some(Request::from_parts(
        parts,
        if bodyless {
            Either::Right(Empty::new())
        } else {
            Either::Left(body)
        },
    ));

    // Front-ends already tried, by identity (they are the same across tables).
    let mut tried: Vec<usize> = Vec::with_capacity(2);
    let mut last_failure: Option<String> = None;
    let mut fresh_connection = false;
    let attempts = table.zones[zone_index].members.len() + 2;
    for attempt in 0..attempts {
        // Every attempt routes by the table in force now: a retry never goes to a front-end
        // that was drained while an earlier attempt was waiting.
        if shared.generation() > table.generation {
            let now = shared.table.load_full();
            let zone_name = &table.zones[zone_index].name;
            let Some(index) = now.zones.iter().position(|z| &z.name == zone_name) else {
                break;
            };
            (table, zone_index) = (now, index);
        }
        let zone = &table.zones[zone_index];
        let Some(i) = zone.pick(app.as_str(), &tried) else {
            break;
        };
        let upstream = &zone.members[i].upstream;
        let in_flight = upstream.start_request();
        // A table applied between the pick and the count above may have been acknowledged
        // with this front-end at zero in flight: pick again by the new table.
        if shared.generation() > table.generation {
            continue;
        }
        if attempt > 0 {
            shared.metrics.retry(&upstream.name, &zone.name);
        }
        let connection = if fresh_connection {
            upstream.connect().await.map(|sender| Conn {
                sender,
                fresh: true,
            })
        } else {
            upstream.connection().await
        };
        fresh_connection = false;
        let mut conn = match connection {
            Ok(conn) => conn,
            Err(e) => {
                upstream.failed_passively(&e.to_string());
                last_failure = Some(format!("{}: {e}", upstream.name));
                tried.push(upstream.id());
                continue;
            }
        };
        let Some(outgoing) = pending.take() else {
            break;
        };
        // The response timeout starts once the request is sent: for a request with a body it
        // would include the upload, so there the front-end's own time limit applies.
        let sent = if bodyless {
            tokio::time::timeout(
                shared.proxy.response_timeout,
                conn.sender.try_send_request(outgoing),
            )
            .await
        } else {
            Ok(conn.sender.try_send_request(outgoing).await)
        };
        match sent {
            Ok(Ok(response)) => {
                return Ok(relay(
                    response,
                    conn.sender,
                    in_flight,
                    &shared,
                    app,
                    started,
                ));
            }
            Err(_) => {
                return Ok(answer(
                    &shared,
                    started,
                    &app,
                    StatusCode::GATEWAY_TIMEOUT,
                    format!(
                        "front-end {} did not start answering within {:?}",
                        upstream.name, shared.proxy.response_timeout
                    ),
                ));
            }
            Ok(Err(mut e)) => {
                if let Some(unsent) = e.take_message() {
                    // Never written: the pooled connection was closing. Try again on a new one.
                    pending = Some(unsent);
                    if !conn.fresh {
                        fresh_connection = true;
                        continue;
                    }
                    upstream.failed_passively(&format!("connection unusable: {}", e.error()));
                    tried.push(upstream.id());
                    continue;
                }
                let why = format!("{} before any response byte", e.error());
                upstream.failed_passively(&why);
                last_failure = Some(format!("{}: {why}", upstream.name));
                tried.push(upstream.id());
                match (&replay, idempotent) {
                    (Some((method, uri, headers)), true) => {
                        let mut again = Request::new(Either::Right(Empty::new()));
                        *again.method_mut() = method.clone();
                        *again.uri_mut() = uri.clone();
                        *again.headers_mut() = headers.clone();
                        pending = Some(again);
                    }
                    _ => {
                        return Ok(answer(
                            &shared,
                            started,
                            &app,
                            StatusCode::BAD_GATEWAY,
                            format!(
                                "front-end {why}; the request was not sent again because it is not idempotent or had a body"
                            ),
                        ));
                    }
                }
            }
        }
    }
    Ok(match last_failure {
        Some(failure) => answer(
            &shared,
            started,
            &app,
            StatusCode::BAD_GATEWAY,
            format!(
                "no front-end of zone {} answered: {failure}",
                table.zones[zone_index].name
            ),
        ),
        None => {
            let mut response = answer(
                &shared,
                started,
                &app,
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "no front-end can take {app} now: {}; `paddock routing` shows why",
                    table.zones[zone_index].describe_unroutable(&app)
                ),
            );
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            response
        }
    })
}

/// Exactly one valid `Host` (none is allowed for HTTP/1.0 only).
fn check_host(request: &Request<Incoming>) -> Result<Option<HeaderValue>, &'static str> {
    let mut all = request.headers().get_all(header::HOST).iter();
    let host = match (all.next(), all.next()) {
        (Some(host), None) => host,
        (None, _) if request.version() == Version::HTTP_10 => return Ok(None),
        (None, _) => return Err("the request has no Host header; HTTP/1.1 requires one"),
        (Some(_), Some(_)) => return Err("the request has more than one Host header"),
    };
    let valid = host
        .to_str()
        .ok()
        .filter(|s| !s.contains('@'))
        .and_then(|s| s.parse::<Authority>().ok())
        .is_some_and(|a| {
            let h = a.host();
            !h.is_empty()
                && (h.starts_with('[')
                    || h.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_')))
        });
    if valid {
        Ok(Some(host.clone()))
    } else {
        Err("the Host header is not a valid host[:port]")
    }
}

/// `Transfer-Encoding` other than a single `chunked`: hyper would take it (chunked is last),
/// but the other codings would be lost on the way, so such a request is refused.
fn check_transfer_encoding(headers: &HeaderMap) -> Option<&'static str> {
    let mut all = headers.get_all(header::TRANSFER_ENCODING).iter();
    match (all.next(), all.next()) {
        (None, _) => None,
        (Some(te), None) if te.as_bytes().eq_ignore_ascii_case(b"chunked") => None,
        _ => Some(
            "only `Transfer-Encoding: chunked` is supported; send the body without other transfer codings",
        ),
    }
}

fn is_bodyless(headers: &HeaderMap) -> bool {
    !headers.contains_key(header::TRANSFER_ENCODING)
        && headers
            .get(header::CONTENT_LENGTH)
            .is_none_or(|v| v.as_bytes() == b"0")
}

/// Headers that describe one connection, not the message: never forwarded.
const HOP_BY_HOP: [HeaderName; 6] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
}

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// `peer_ip` is the client's address as a header value (made once per connection).
fn prepare_headers(headers: &mut HeaderMap, peer_ip: &HeaderValue, host: Option<HeaderValue>) {
    strip_hop_by_hop(headers);
    let earlier: Vec<&str> = headers
        .get_all(&X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    let forwarded_for = if earlier.is_empty() {
        Some(peer_ip.clone())
    } else {
        let ip = peer_ip.to_str().unwrap_or_default();
        HeaderValue::from_str(&format!("{}, {ip}", earlier.join(", "))).ok()
    };
    if let Some(value) = forwarded_for {
        headers.insert(X_FORWARDED_FOR.clone(), value);
    }
    headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static("http"));
    if let Some(host) = host {
        headers.insert(X_FORWARDED_HOST.clone(), host);
    }
}

fn origin_form(uri: &Uri) -> Uri {
    if uri.scheme().is_none() && uri.authority().is_none() {
        return uri.clone();
    }
    let path = uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    Uri::from(path)
}

fn relay(
    response: Response<Incoming>,
    sender: SendRequest<UpBody>,
    in_flight: InFlight,
    shared: &Arc<Shared>,
    app: Arc<String>,
    started: Instant,
) -> Response<ProxyBody> {
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    let version = parts
        .headers
        .get("x-paddock-version")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let labels = RequestLabels {
        app,
        version,
        status: parts.status.as_u16(),
        server: in_flight.upstream().label.clone(),
    };
    let mut relay = Relay {
        body,
        end: Some(RelayEnd {
            sender,
            in_flight,
            shared: shared.clone(),
            labels,
            started,
        }),
    };
    if relay.body.is_end_stream() {
        relay.finish(true);
    }
    Response::from_parts(parts, ProxyBody::Relay(relay))
}

fn refuse(
    shared: &Shared,
    started: Instant,
    app: &str,
    status: StatusCode,
    message: &str,
) -> Response<ProxyBody> {
    let mut response = answer(shared, started, app, status, message.to_string());
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// An answer of the balancer itself: plain text naming the problem.
fn answer(
    shared: &Shared,
    started: Instant,
    app: &str,
    status: StatusCode,
    message: String,
) -> Response<ProxyBody> {
    if status.is_server_error() {
        tracing::warn!(app, status = status.as_u16(), "{message}");
    } else {
        tracing::debug!(app, status = status.as_u16(), "{message}");
    }
    shared.metrics.request(
        RequestLabels {
            app: Arc::new(app.to_string()),
            version: String::new(),
            status: status.as_u16(),
            server: Arc::default(),
        },
        started.elapsed().as_secs_f64(),
    );
    let mut response = Response::new(ProxyBody::Full(Full::new(Bytes::from(message + "\n"))));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// A response body: relayed from a front-end, or the balancer's own.
pub enum ProxyBody {
    Relay(Relay),
    Full(Full<Bytes>),
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ProxyBody::Relay(relay) => {
                let polled = Pin::new(&mut relay.body).poll_frame(cx);
                match &polled {
                    Poll::Ready(None) => relay.finish(true),
                    Poll::Ready(Some(Ok(_))) if relay.body.is_end_stream() => relay.finish(true),
                    Poll::Ready(Some(Err(_))) => relay.finish(false),
                    _ => {}
                }
                polled
            }
            ProxyBody::Full(full) => Pin::new(full)
                .poll_frame(cx)
                .map_err(|never| match never {}),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Relay(relay) => relay.body.is_end_stream(),
            ProxyBody::Full(full) => full.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Relay(relay) => relay.body.size_hint(),
            ProxyBody::Full(full) => full.size_hint(),
        }
    }
}

/// A front-end's response body on its way to the client. When it has been relayed whole, the
/// connection goes back to the pool; the request leaves the in-flight count and the metrics
/// when the body ends or the client goes away.
pub struct Relay {
    body: Incoming,
    end: Option<RelayEnd>,
}

struct RelayEnd {
    sender: SendRequest<UpBody>,
    in_flight: InFlight,
    shared: Arc<Shared>,
    labels: RequestLabels,
    started: Instant,
}

impl Relay {
    fn finish(&mut self, complete: bool) {
        let Some(end) = self.end.take() else {
            return;
        };
        if complete {
            end.in_flight.upstream().checkin(end.sender);
        }
        end.shared
            .metrics
            .request(end.labels, end.started.elapsed().as_secs_f64());
        drop(end.in_flight);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let complete = self.body.is_end_stream();
        self.finish(complete);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_not_forwarded() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
        h.insert("x-kept", HeaderValue::from_static("yes"));
        let host = HeaderValue::from_static("shop.example:8080");
        let peer = HeaderValue::from_static("127.0.0.9");
        prepare_headers(&mut h, &peer, Some(host));
        assert_eq!(h.get("x-forwarded-for").unwrap(), "10.0.0.1, 127.0.0.9");
        assert_eq!(h.get("x-forwarded-proto").unwrap(), "http");
        assert_eq!(h.get("x-forwarded-host").unwrap(), "shop.example:8080");
        assert_eq!(h.get("x-kept").unwrap(), "yes");
        for gone in ["connection", "x-secret", "keep-alive", "transfer-encoding"] {
            assert!(!h.contains_key(gone), "{gone}");
        }
    }

    #[test]
    fn absolute_form_becomes_origin_form() {
        let uri: Uri = "http://example.com/a/b?c=1".parse().unwrap();
        assert_eq!(origin_form(&uri), "/a/b?c=1");
        let uri: Uri = "/x".parse().unwrap();
        assert_eq!(origin_form(&uri), "/x");
    }
}
