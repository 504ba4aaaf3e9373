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
use http::uri::Authority;
use http::{Method, Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use paddock_core::route::{RESERVED_PREFIX, route_matches};

use crate::Shared;
use crate::h1::{self, Connection, ExchangeError, ResponseBody};
use crate::metrics::RequestLabels;
use crate::upstream::InFlight;

/// Whether `path` is the platform's own (`/_paddock` and below), by the rule that refuses such a
/// route in a manifest.
fn is_reserved(path: &str) -> bool {
    route_matches(RESERVED_PREFIX, path)
}

/// Settings of the request path.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// Longest a front-end may take to start its response.
    pub response_timeout: Duration,
}

/// Checks, routes and forwards a request. With the access log on, what it tells of the request
/// is taken from the head first, given the app and the tries, and recorded by the answer: at
/// once for the balancer's own, when the body ends for a relayed one.
pub async fn handle(
    request: Request<Incoming>,
    shared: Arc<Shared>,
    peer_ip: HeaderValue,
    suspect: Option<Arc<AtomicBool>>,
) -> Result<Response<ProxyBody>, Infallible> {
    let started = Instant::now();
    let logged = &mut shared
        .access_log
        .as_ref()
        .map(|log| Box::new(Logged::of(log, started, &request, &peer_ip)));
    let shared = &shared;
    if suspect.is_some_and(|suspect| suspect.load(Ordering::Acquire)) {
        return Ok(refuse(
            shared,
            started,
            "",
            StatusCode::BAD_REQUEST,
            "ambiguous request framing: Content-Length together with Transfer-Encoding, or Content-Length twice; send exactly one of them",
            logged,
            None,
        ));
    }
    if request.method() == Method::CONNECT {
        return Ok(refuse(
            shared,
            started,
            "",
            StatusCode::NOT_IMPLEMENTED,
            "CONNECT is not supported: the balancer forwards requests to apps, it opens no tunnels",
            logged,
            None,
        ));
    }
    let host = match check_host(&request) {
        Ok(host) => host,
        Err(message) => {
            return Ok(refuse(
                shared,
                started,
                "",
                StatusCode::BAD_REQUEST,
                message,
                logged,
                None,
            ));
        }
    };
    let path = request.uri().path();
    if is_reserved(path) {
        return Ok(answer(
            shared,
            started,
            "",
            StatusCode::NOT_FOUND,
            format!("{path}: {RESERVED_PREFIX} belongs to the platform and is not routed to apps"),
            logged,
            None,
        ));
    }
    let table = shared.table.load_full();
    if table.generation == 0 {
        return Ok(answer(
            shared,
            started,
            "",
            StatusCode::SERVICE_UNAVAILABLE,
            "this balancer has no routing table yet: the controller has not answered; its log says why".into(),
            logged,
            None,
        ));
    }
    let Some(route) = table.route(path) else {
        return Ok(answer(
            shared,
            started,
            "",
            StatusCode::NOT_FOUND,
            format!(
                "no app is routed at {path}; `paddock app list` shows the apps and their routes"
            ),
            logged,
            None,
        ));
    };
    let app = route.app.clone();
    if let Some(logged) = logged {
        logged.app = Some(app.clone());
    }
    let mut zone_index = route.zone;
    let mut table = table;
    if let Some(refusal) = check_transfer_encoding(request.headers()) {
        return Ok(refuse(
            shared,
            started,
            &app,
            StatusCode::NOT_IMPLEMENTED,
            refusal,
            logged,
            None,
        ));
    }

    let (parts, body) = request.into_parts();
    // HTTP/2 frames a body without `Content-Length` by its stream's end: it goes on chunked.
    let (bodyless, chunked) = if parts.version == Version::HTTP_2 {
        let bodyless = body.is_end_stream();
        let length = parts.headers.contains_key(header::CONTENT_LENGTH);
        (bodyless, !bodyless && !length)
    } else {
        (
            is_bodyless(&parts.headers),
            parts.headers.contains_key(header::TRANSFER_ENCODING),
        )
    };
    let idempotent = matches!(
        parts.method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    );
    let head_request = parts.method == Method::HEAD;
    // Encoded once: a retry sends the same bytes, and the same request id.
    let (head, id) = encode_head(
        &parts,
        &peer_ip,
        host.as_ref(),
        chunked,
        shared.https,
        &shared.request_ids,
    );
    let request_id = &head[id];
    if let Some(logged) = logged {
        logged.request_id = Some(String::from_utf8_lossy(request_id).into_owned());
    }
    let mut body = (!bodyless).then_some(body);

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
        if let Some(logged) = logged {
            logged.tries += 1;
        }
        let pooled = (!fresh_connection)
            .then(|| upstream.checkout(started))
            .flatten();
        let connection = match pooled {
            Some(conn) => Ok(conn),
            None => upstream.connect(shared.sends().as_ref()).await,
        };
        fresh_connection = false;
        let conn = match connection {
            Ok(conn) => conn,
            Err(e) => {
                if let Some(hint) = crate::upstream::shortage(&e) {
                    // This machine's want, not the front-end's failure: no front-end is marked
                    // down for it, and another would fail the same way.
                    crate::upstream::warn_shortage(&e, hint);
                    return Ok(answer(
                        shared,
                        started,
                        &app,
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!(
                            "the balancer cannot open a connection to a front-end now ({e}); try again shortly"
                        ),
                        logged,
                        Some(request_id),
                    ));
                }
                let why = format!("connect failed: {e}");
                upstream.failed_passively(&why);
                last_failure = Some(format!("{}: {why}", upstream.name));
                tried.push(upstream.id());
                continue;
            }
        };
        let reused = conn.reused;
        // The response timeout starts once the request is sent: for a request with a body it
        // would include the upload, so there the front-end's own time limit applies.
        let outcome = if bodyless {
            match tokio::time::timeout(
                shared.proxy.response_timeout,
                exchange(conn, &head, head_request),
            )
            .await
            {
                Ok(outcome) => outcome.map_err(|e| (e, None)),
                Err(_) => {
                    return Ok(answer(
                        shared,
                        started,
                        &app,
                        StatusCode::GATEWAY_TIMEOUT,
                        format!(
                            "front-end {} did not start answering within {:?}",
                            upstream.name, shared.proxy.response_timeout
                        ),
                        logged,
                        Some(request_id),
                    ));
                }
            }
        } else {
            let Some(body) = body.take() else {
                break;
            };
            exchange_with_body(conn, &head, body, chunked, head_request).await
        };
        match outcome {
            Ok((parts, response)) => {
                return Ok(relay(
                    parts,
                    response,
                    in_flight,
                    shared,
                    app,
                    started,
                    logged.take(),
                ));
            }
            Err((ExchangeError::Unsent(e), unsent)) => {
                body = unsent;
                if reused {
                    // The pooled connection was closing: try again on a new one.
                    fresh_connection = true;
                    continue;
                }
                let why = format!("connection unusable: {e}");
                upstream.failed_passively(&why);
                last_failure = Some(format!("{}: {why}", upstream.name));
                tried.push(upstream.id());
            }
            Err((ExchangeError::NoResponse(why), _)) => {
                let replayable = bodyless && idempotent;
                if reused && replayable {
                    // A keep-alive connection the front-end closed as the request went out.
                    fresh_connection = true;
                    continue;
                }
                // On a kept-alive connection, most likely the same race, which says nothing of
                // the front-end's health (active checks see a dead one).
                if !reused {
                    upstream.failed_passively(&why);
                    last_failure = Some(format!("{}: {why}", upstream.name));
                    tried.push(upstream.id());
                }
                if !replayable {
                    let on = if reused {
                        " on a kept-alive connection"
                    } else {
                        ""
                    };
                    return Ok(answer(
                        shared,
                        started,
                        &app,
                        StatusCode::BAD_GATEWAY,
                        format!(
                            "front-end {}: {why}{on}; the request was not sent again because it is not idempotent or had a body",
                            upstream.name
                        ),
                        logged,
                        Some(request_id),
                    ));
                }
            }
            Err((ExchangeError::Invalid(why), _)) => {
                return Ok(answer(
                    shared,
                    started,
                    &app,
                    StatusCode::BAD_GATEWAY,
                    format!("front-end {} sent an {why}", upstream.name),
                    logged,
                    Some(request_id),
                ));
            }
            Err((error @ ExchangeError::ClientBody(_), _)) => {
                return Ok(refuse(
                    shared,
                    started,
                    &app,
                    StatusCode::BAD_REQUEST,
                    &error.to_string(),
                    logged,
                    Some(request_id),
                ));
            }
        }
    }
    Ok(match last_failure {
        Some(failure) => answer(
            shared,
            started,
            &app,
            StatusCode::BAD_GATEWAY,
            format!(
                "no front-end of zone {} answered: {failure}",
                table.zones[zone_index].name
            ),
            logged,
            Some(request_id),
        ),
        None => {
            let mut response = answer(
                shared,
                started,
                &app,
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "no front-end can take {app} now: {}; `paddock routing` shows why",
                    table.zones[zone_index].describe_unroutable(&app)
                ),
                logged,
                Some(request_id),
            );
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            response
        }
    })
}

/// What the access log tells of a request, taken from its head before it is forwarded, with
/// the app and the tries once known.
pub(crate) struct Logged {
    log: crate::access_log::AccessLog,
    started: Instant,
    /// Recorded already: a guard dropped before records that the client went away.
    recorded: bool,
    client: HeaderValue,
    method: Method,
    host: Option<HeaderValue>,
    target: Option<http::uri::PathAndQuery>,
    protocol: Version,
    app: Option<Arc<String>>,
    tries: u32,
    /// The id forwarded to the front-ends (none: the request was refused before).
    request_id: Option<String>,
}

/// How a request was answered, for the access log.
struct Answered<'a> {
    status: u16,
    bytes: u64,
    version: Option<&'a str>,
    server: Option<&'a str>,
    complete: bool,
    error: Option<&'a str>,
}

impl Logged {
    fn of(
        log: &crate::access_log::AccessLog,
        started: Instant,
        request: &Request<Incoming>,
        client: &HeaderValue,
    ) -> Logged {
        Logged {
            log: log.clone(),
            started,
            recorded: false,
            client: client.clone(),
            method: request.method().clone(),
            host: request.headers().get(header::HOST).cloned().or_else(|| {
                // No `Host`: the request's authority (HTTP/2's `:authority`).
                let authority = request.uri().authority()?;
                HeaderValue::from_str(authority.as_str()).ok()
            }),
            target: request.uri().path_and_query().cloned(),
            protocol: request.version(),
            app: None,
            tries: 0,
            request_id: None,
        }
    }

    /// Records the request's line (the first call only).
    fn record(&mut self, answered: Answered<'_>) {
        if std::mem::replace(&mut self.recorded, true) {
            return;
        }
        let elapsed = self.started.elapsed();
        let host = self
            .host
            .as_ref()
            .map(|h| String::from_utf8_lossy(h.as_bytes()));
        self.log.record(&crate::access_log::Entry {
            time: crate::access_log::began(elapsed),
            client: self.client.to_str().unwrap_or_default(),
            method: self.method.as_str(),
            host: host.as_deref().unwrap_or_default(),
            target: self.target.as_ref().map_or("", |t| t.as_str()),
            protocol: match self.protocol {
                Version::HTTP_2 => "HTTP/2.0",
                Version::HTTP_10 => "HTTP/1.0",
                _ => "HTTP/1.1",
            },
            status: answered.status,
            bytes: answered.bytes,
            ms: crate::access_log::millis(elapsed),
            app: self.app.as_deref().map(String::as_str),
            version: answered.version,
            server: answered.server,
            tries: self.tries,
            request_id: self.request_id.as_deref(),
            complete: answered.complete,
            error: answered.error,
        });
    }
}

/// A request dropped before its answer was recorded: the client closed its connection first
/// (hyper then drops the request), or a stop cut it.
impl Drop for Logged {
    fn drop(&mut self) {
        self.record(Answered {
            status: CLIENT_GONE,
            bytes: 0,
            version: None,
            server: None,
            complete: false,
            error: Some(
                "the client closed its connection before the answer, or a stop cut the request",
            ),
        });
    }
}

/// The status the access log gives a request whose client went away before the answer (as
/// nginx logs it; no response was sent).
const CLIENT_GONE: u16 = 499;

type Exchanged = Result<(http::response::Parts, ResponseBody), (ExchangeError, Option<Incoming>)>;

/// A request without a body: its head, then the response's.
async fn exchange(
    mut conn: Connection,
    head: &[u8],
    head_request: bool,
) -> Result<(http::response::Parts, ResponseBody), ExchangeError> {
    conn.write_head(head).await?;
    conn.read_response(head_request).await
}

/// A request with a body; the body comes back when nothing was sent.
async fn exchange_with_body(
    mut conn: Connection,
    head: &[u8],
    body: Incoming,
    chunked: bool,
    head_request: bool,
) -> Exchanged {
    if let Err(e) = conn.write_head_now(head).await {
        return Err((e, Some(body)));
    }
    match conn.write_body(body, chunked).await {
        Ok(()) => conn
            .read_response(head_request)
            .await
            .map_err(|e| (e, None)),
        Err(Err(client)) => Err((ExchangeError::ClientBody(client), None)),
        Err(Ok(sending)) => {
            // The front-end stopped reading the body: it may have answered already.
            match conn.read_response(head_request).await {
                Ok((parts, mut response)) => {
                    response.forbid_reuse();
                    Ok((parts, response))
                }
                Err(_) => Err((
                    ExchangeError::NoResponse(format!(
                        "sending the request body failed ({sending})"
                    )),
                    None,
                )),
            }
        }
    }
}

/// Exactly one valid `Host` (none is allowed for HTTP/1.0 only). Over HTTP/2 the request's
/// `:authority` stands for it, and a `Host` sent besides must agree (RFC 9113, 8.3.1).
fn check_host<B>(request: &Request<B>) -> Result<Option<HeaderValue>, &'static str> {
    let mut all = request.headers().get_all(header::HOST).iter();
    let (first, second) = (all.next(), all.next());
    if request.version() == Version::HTTP_2 {
        let authority = request.uri().authority().map(|a| a.as_str());
        return match (authority, first, second) {
            (_, _, Some(_)) => Err("the request has more than one Host header"),
            (Some(authority), Some(host), None)
                if !host.as_bytes().eq_ignore_ascii_case(authority.as_bytes()) =>
            {
                Err("the Host header differs from the request's :authority")
            }
            (Some(authority), _, None) => HeaderValue::from_str(authority)
                .map_err(|_| "the request's :authority is not a valid host[:port]")
                .and_then(valid_host)
                .map(Some),
            (None, Some(host), None) => valid_host(host.clone()).map(Some),
            (None, None, _) => Err("the request has neither :authority nor a Host header"),
        };
    }
    match (first, second) {
        (Some(host), None) => valid_host(host.clone()).map(Some),
        (None, _) if request.version() == Version::HTTP_10 => Ok(None),
        (None, _) => Err("the request has no Host header; HTTP/1.1 requires one"),
        (Some(_), Some(_)) => Err("the request has more than one Host header"),
    }
}

/// `host` when it is a host name or address with an optional port, and nothing else.
fn valid_host(host: HeaderValue) -> Result<HeaderValue, &'static str> {
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
        Ok(host)
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

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static X_PADDOCK_VERSION: HeaderName = HeaderName::from_static("x-paddock-version");
static X_REQUEST_ID: HeaderName = HeaderName::from_static(paddock_core::request_id::HEADER);

/// The request head as the front-end gets it: origin-form target, HTTP/1.1, the client's headers
/// without the hop-by-hop ones (and those its `Connection` names) and `Expect` (answered here),
/// the request's id, then `X-Forwarded-For` (appended to), `-Proto` and `-Host`. `peer_ip` is the
/// client's address (made once per connection). A chunked body is sent chunked again.
///
/// The id is the client's first valid `X-Request-Id`, else the next of `ids`; the range returned
/// is where it is in the head.
fn encode_head(
    parts: &http::request::Parts,
    peer_ip: &HeaderValue,
    host: Option<&HeaderValue>,
    chunked: bool,
    https: bool,
    ids: &paddock_core::request_id::Ids,
) -> (Vec<u8>, std::ops::Range<usize>) {
    let headers = &parts.headers;
    let mut head = Vec::with_capacity(256 + headers.len() * 32);
    head.extend_from_slice(parts.method.as_str().as_bytes());
    head.push(b' ');
    let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    head.extend_from_slice(target.as_bytes());
    head.extend_from_slice(b" HTTP/1.1\r\n");
    // Over HTTP/2 the host is the `:authority`, and a client may send each cookie as a field
    // of its own: HTTP/1.1 wants a `Host` and one `Cookie` (RFC 9113, 8.3.1 and 8.2.3).
    let h2 = parts.version == Version::HTTP_2;
    if h2
        && !headers.contains_key(header::HOST)
        && let Some(host) = host
    {
        push_field(&mut head, b"host", host.as_bytes());
    }
    // The headers the client's `Connection` names are hop-by-hop, except those that frame the
    // request or name its host: dropping `Content-Length` would send the body as a request of
    // its own (smuggling).
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .filter_map(|t| HeaderName::from_bytes(t.trim_ascii()).ok())
        .filter(|n| {
            *n != header::CONTENT_LENGTH && *n != header::TRANSFER_ENCODING && *n != header::HOST
        })
        .collect();
    let mut id = None;
    let mut length_sent = false;
    for (name, value) in headers {
        if *name == X_REQUEST_ID {
            // The first valid one is kept; others (and any after it) are dropped.
            if id.is_none() && paddock_core::request_id::is_valid(value.as_bytes()) {
                let start = head.len() + X_REQUEST_ID.as_str().len() + 2;
                push_field(
                    &mut head,
                    X_REQUEST_ID.as_str().as_bytes(),
                    value.as_bytes(),
                );
                id = Some(start..start + value.len());
            }
            continue;
        }
        if h2 && *name == header::COOKIE {
            continue;
        }
        // HTTP/2 lets equal duplicates through (h2 checked them against the body): one is sent.
        if h2 && *name == header::CONTENT_LENGTH && std::mem::replace(&mut length_sent, true) {
            continue;
        }
        if h1::is_hop_by_hop(name)
            || *name == header::EXPECT
            || *name == X_FORWARDED_FOR
            || *name == X_FORWARDED_PROTO
            || *name == X_FORWARDED_HOST
            || (chunked && *name == header::CONTENT_LENGTH)
            || named.contains(name)
        {
            continue;
        }
        push_field(&mut head, name.as_str().as_bytes(), value.as_bytes());
    }
    let id = match id {
        Some(id) => id,
        None => {
            head.extend_from_slice(b"x-request-id: ");
            let start = head.len();
            ids.push_next(&mut head);
            let end = head.len();
            head.extend_from_slice(b"\r\n");
            start..end
        }
    };
    if h2 {
        let mut cookies = headers.get_all(header::COOKIE).iter();
        if let Some(first) = cookies.next() {
            head.extend_from_slice(b"cookie: ");
            head.extend_from_slice(first.as_bytes());
            for cookie in cookies {
                head.extend_from_slice(b"; ");
                head.extend_from_slice(cookie.as_bytes());
            }
            head.extend_from_slice(b"\r\n");
        }
    }
    if chunked {
        head.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    head.extend_from_slice(b"x-forwarded-for: ");
    for earlier in headers.get_all(&X_FORWARDED_FOR) {
        head.extend_from_slice(earlier.as_bytes());
        head.extend_from_slice(b", ");
    }
    head.extend_from_slice(peer_ip.as_bytes());
    head.extend_from_slice(b"\r\n");
    head.extend_from_slice(if https {
        b"x-forwarded-proto: https\r\n"
    } else {
        b"x-forwarded-proto: http\r\n"
    });
    if let Some(host) = host {
        push_field(&mut head, b"x-forwarded-host", host.as_bytes());
    }
    head.extend_from_slice(b"\r\n");
    (head, id)
}

fn push_field(head: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    head.extend_from_slice(name);
    head.extend_from_slice(b": ");
    head.extend_from_slice(value);
    head.extend_from_slice(b"\r\n");
}

fn relay(
    mut parts: http::response::Parts,
    body: ResponseBody,
    in_flight: InFlight,
    shared: &Arc<Shared>,
    app: Arc<String>,
    started: Instant,
    logged: Option<Box<Logged>>,
) -> Response<ProxyBody> {
    let version = in_flight.upstream().version_label(
        parts
            .headers
            .get(&X_PADDOCK_VERSION)
            .map_or(&b""[..], |v| v.as_bytes()),
    );
    let labels = RequestLabels {
        app,
        version,
        status: parts.status.as_u16(),
        server: in_flight.upstream().label.clone(),
    };
    let mut relay = Relay {
        body: Some(body),
        sent: 0,
        end: Some(RelayEnd {
            in_flight,
            shared: shared.clone(),
            labels,
            started,
            logged,
        }),
    };
    if relay.is_end_stream() {
        relay.finish(true);
    }
    if shared.closing() {
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    Response::from_parts(parts, ProxyBody::Relay(relay))
}

fn refuse(
    shared: &Shared,
    started: Instant,
    app: &str,
    status: StatusCode,
    message: &str,
    logged: &mut Option<Box<Logged>>,
    request_id: Option<&[u8]>,
) -> Response<ProxyBody> {
    let mut response = answer(
        shared,
        started,
        app,
        status,
        message.to_string(),
        logged,
        request_id,
    );
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// The balancer's own 5xx answers are logged [`OWN_ERRORS_SAID`] per [`OWN_ERRORS_WINDOW`] at
/// most: in an outage every request would say the same, and the log would grow as fast as the
/// traffic.
const OWN_ERRORS_SAID: u32 = 10;
const OWN_ERRORS_WINDOW: Duration = Duration::from_secs(1);
static SAID: std::sync::Mutex<Said> = std::sync::Mutex::new(Said {
    since: None,
    said: 0,
    unsaid: 0,
});

/// What has been logged in the current window.
struct Said {
    since: Option<Instant>,
    said: u32,
    unsaid: u64,
}

enum Say {
    /// Log it; `unsaid` were left out since the last one logged.
    Yes {
        unsaid: u64,
    },
    No,
}

impl Said {
    fn take(&mut self, now: Instant) -> Say {
        if self
            .since
            .is_none_or(|since| now.saturating_duration_since(since) >= OWN_ERRORS_WINDOW)
        {
            self.since = Some(now);
            self.said = 0;
        }
        if self.said >= OWN_ERRORS_SAID {
            self.unsaid += 1;
            return Say::No;
        }
        self.said += 1;
        Say::Yes {
            unsaid: std::mem::take(&mut self.unsaid),
        }
    }
}

/// An answer of the balancer itself: plain text naming the problem.
fn answer(
    shared: &Shared,
    started: Instant,
    app: &str,
    status: StatusCode,
    message: String,
    logged: &mut Option<Box<Logged>>,
    request_id: Option<&[u8]>,
) -> Response<ProxyBody> {
    if let Some(mut logged) = logged.take() {
        let bytes = match logged.method {
            Method::HEAD => 0,
            _ => message.len() as u64 + 1,
        };
        logged.record(Answered {
            status: status.as_u16(),
            bytes,
            version: None,
            server: None,
            complete: true,
            error: Some(&message),
        });
    }
    if status.is_server_error() {
        match SAID.lock().map(|mut said| said.take(Instant::now())) {
            Ok(Say::Yes { unsaid }) => {
                if unsaid > 0 {
                    tracing::warn!(
                        "{unsaid} more answers of the balancer's own with a 5xx status were not logged in the last {:?} (the access log and /metrics have them all)",
                        OWN_ERRORS_WINDOW
                    );
                }
                tracing::warn!(app, status = status.as_u16(), "{message}");
            }
            Ok(Say::No) | Err(_) => {}
        }
    } else {
        tracing::debug!(app, status = status.as_u16(), "{message}");
    }
    shared.metrics.request(
        RequestLabels {
            app: Arc::new(app.to_string()),
            version: Arc::default(),
            status: status.as_u16(),
            server: Arc::default(),
        },
        started.elapsed().as_secs_f64(),
    );
    let mut response = Response::new(ProxyBody::Own(Some(Bytes::from(message + "\n"))));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if shared.closing() {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    // Given once the request was on its way to a front-end: the id its lines are under.
    if let Some(id) = request_id.and_then(|id| HeaderValue::from_bytes(id).ok()) {
        response.headers_mut().insert(X_REQUEST_ID.clone(), id);
    }
    response
}

/// A response body: relayed from a front-end, or the balancer's own (whole, until sent).
// The relay is what nearly every response is: boxing it would cost an allocation each.
#[allow(clippy::large_enum_variant)]
pub enum ProxyBody {
    Relay(Relay),
    Own(Option<Bytes>),
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        match self.get_mut() {
            ProxyBody::Relay(relay) => {
                let Some(body) = relay.body.as_mut() else {
                    return Poll::Ready(None);
                };
                let polled = Pin::new(body).poll_frame(cx);
                if let Poll::Ready(Some(Ok(frame))) = &polled
                    && let Some(data) = frame.data_ref()
                {
                    relay.sent += data.len() as u64;
                }
                match &polled {
                    Poll::Ready(None) => relay.finish(true),
                    Poll::Ready(Some(Ok(_))) if relay.is_end_stream() => relay.finish(true),
                    Poll::Ready(Some(Err(_))) => relay.finish(false),
                    _ => {}
                }
                polled
            }
            ProxyBody::Own(own) => Poll::Ready(own.take().map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Relay(relay) => relay.is_end_stream(),
            ProxyBody::Own(own) => own.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Relay(relay) => relay
                .body
                .as_ref()
                .map_or_else(|| SizeHint::with_exact(0), |b| b.size_hint()),
            ProxyBody::Own(own) => SizeHint::with_exact(own.as_ref().map_or(0, |b| b.len() as u64)),
        }
    }
}

/// A front-end's response body on its way to the client. When it has been relayed whole, the
/// connection goes back to the pool; the request leaves the in-flight count and the metrics
/// when the body ends or the client goes away.
pub struct Relay {
    /// Gone once finished.
    body: Option<ResponseBody>,
    /// Body bytes handed to the client.
    sent: u64,
    end: Option<RelayEnd>,
}

struct RelayEnd {
    in_flight: InFlight,
    shared: Arc<Shared>,
    labels: RequestLabels,
    started: Instant,
    /// For the access log, when it is on.
    logged: Option<Box<Logged>>,
}

impl Relay {
    fn is_end_stream(&self) -> bool {
        self.body.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn finish(&mut self, complete: bool) {
        let Some(mut end) = self.end.take() else {
            return;
        };
        let now = Instant::now();
        if let Some(body) = self.body.take()
            && complete
            && let Some(conn) = body.into_connection()
        {
            end.in_flight.upstream().checkin(conn, now);
        }
        let elapsed = now - end.started;
        if let Some(logged) = &mut end.logged {
            let labels = &end.labels;
            logged.record(Answered {
                status: labels.status,
                bytes: self.sent,
                version: (!labels.version.is_empty()).then_some(labels.version.as_str()),
                server: Some(labels.server.as_str()),
                complete,
                error: None,
            });
        }
        end.shared
            .metrics
            .request(end.labels, elapsed.as_secs_f64());
        drop(end.in_flight);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let complete = self.is_end_stream();
        self.finish(complete);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head_of(request: Request<()>, host: Option<&str>) -> String {
        head_over(request, host, false)
    }

    fn head_over(request: Request<()>, host: Option<&str>, https: bool) -> String {
        let (parts, ()) = request.into_parts();
        let host = host.map(|h| HeaderValue::from_str(h).unwrap());
        let peer = HeaderValue::from_static("127.0.0.9");
        let chunked = parts.headers.contains_key(header::TRANSFER_ENCODING);
        let ids = paddock_core::request_id::Ids::new("lb-test", 0);
        let (head, _) = encode_head(&parts, &peer, host.as_ref(), chunked, https, &ids);
        String::from_utf8(head).unwrap()
    }

    #[test]
    fn the_balancer_reserves_exactly_the_paths_no_manifest_may_route() {
        for path in [
            "/_paddock",
            "/_paddock/",
            "/_paddock/health",
            "/_paddockx",
            "/_paddockx/a",
            "/hello",
        ] {
            let refused_as_route =
                paddock_core::route::validate_route(path.trim_end_matches('/')).is_err();
            assert_eq!(is_reserved(path), refused_as_route, "{path}");
        }
        assert!(is_reserved("/_paddock/health"));
        assert!(!is_reserved("/_paddockx"));
    }

    #[test]
    fn hop_by_hop_headers_are_not_forwarded_and_forwarding_headers_are_added() {
        let request = Request::post("/shop/cart?x=1")
            .header("connection", "close, x-secret")
            .header("x-secret", "1")
            .header("keep-alive", "timeout=5")
            .header("transfer-encoding", "chunked")
            .header("content-length", "12")
            .header("expect", "100-continue")
            .header("x-forwarded-for", "10.0.0.1")
            .header("x-forwarded-proto", "https")
            .header("host", "shop.example:8080")
            .header("x-kept", "yes")
            .body(())
            .unwrap();
        let head = head_of(request, Some("shop.example:8080"));
        assert_eq!(
            head,
            "POST /shop/cart?x=1 HTTP/1.1\r\nhost: shop.example:8080\r\nx-kept: yes\r\n\
             x-request-id: lb-test-0-0\r\ntransfer-encoding: chunked\r\nx-forwarded-for: 10.0.0.1, 127.0.0.9\r\n\
             x-forwarded-proto: http\r\nx-forwarded-host: shop.example:8080\r\n\r\n"
        );
    }

    #[test]
    fn connection_cannot_remove_the_framing_or_the_host() {
        let request = Request::post("/a")
            .header("connection", "keep-alive, Content-Length, host, x-drop")
            .header("content-length", "5")
            .header("host", "a.example")
            .header("x-drop", "1")
            .body(())
            .unwrap();
        let head = head_of(request, Some("a.example"));
        assert!(head.contains("content-length: 5\r\n"), "{head}");
        assert!(head.contains("host: a.example\r\n"), "{head}");
        assert!(!head.contains("x-drop"), "{head}");
    }

    #[test]
    fn absolute_form_becomes_origin_form() {
        let request = Request::get("http://example.com/a/b?c=1").body(()).unwrap();
        assert!(head_of(request, None).starts_with("GET /a/b?c=1 HTTP/1.1\r\n"));
        let request = Request::get("/x").body(()).unwrap();
        let head = head_of(request, None);
        assert!(head.starts_with("GET /x HTTP/1.1\r\n"), "{head}");
        assert!(head.ends_with("x-forwarded-proto: http\r\n\r\n"), "{head}");
    }

    #[test]
    fn an_http2_request_reaches_the_frontend_with_its_host_and_one_cookie_field() {
        let request = Request::get("https://example.com:8443/a?b=1")
            .version(Version::HTTP_2)
            .header("cookie", "a=1")
            .header("accept", "*/*")
            .header("cookie", "b=2")
            .body(())
            .unwrap();
        let head = head_over(request, Some("example.com:8443"), true);
        assert!(
            head.starts_with("GET /a?b=1 HTTP/1.1\r\nhost: example.com:8443\r\n"),
            "{head}"
        );
        assert_eq!(head.matches("cookie").count(), 1, "{head}");
        assert!(head.contains("\r\ncookie: a=1; b=2\r\n"), "{head}");
        assert!(head.contains("\r\naccept: */*\r\n"), "{head}");
        assert!(
            head.contains("\r\nx-forwarded-host: example.com:8443\r\n"),
            "{head}"
        );
        // Equal Content-Length fields, which HTTP/2 lets through: one goes on.
        let request = Request::post("https://example.com/a")
            .version(Version::HTTP_2)
            .header("content-length", "3")
            .header("content-length", "3")
            .body(())
            .unwrap();
        let head = head_over(request, Some("example.com"), true);
        assert_eq!(head.matches("content-length: 3\r\n").count(), 1, "{head}");
        // HTTP/1.1 cookies go as they came.
        let request = Request::get("/a")
            .header("host", "example.com")
            .header("cookie", "a=1")
            .header("cookie", "b=2")
            .body(())
            .unwrap();
        let head = head_of(request, Some("example.com"));
        assert!(
            head.contains("\r\ncookie: a=1\r\ncookie: b=2\r\n"),
            "{head}"
        );
        assert_eq!(head.matches("host: example.com\r\n").count(), 2, "{head}");
    }

    #[test]
    fn an_http2_request_names_its_host_by_its_authority_and_a_host_header_must_agree() {
        let h2 = |uri: &str, hosts: &[&str]| {
            let mut request = Request::get(uri).version(Version::HTTP_2);
            for host in hosts {
                request = request.header("host", *host);
            }
            check_host(&request.body(()).unwrap())
        };
        let host = |s: &str| Ok(Some(HeaderValue::from_str(s).unwrap()));
        assert_eq!(h2("https://example.com/a", &[]), host("example.com"));
        assert_eq!(
            h2("https://example.com:8443/a", &[]),
            host("example.com:8443")
        );
        assert_eq!(
            h2("https://example.com/a", &["example.com"]),
            host("example.com")
        );
        assert_eq!(h2("/a", &["example.com"]), host("example.com"));
        let refused = |result: Result<Option<HeaderValue>, &str>, says: &str| {
            assert!(result.is_err_and(|e| e.contains(says)), "{says}");
        };
        assert_eq!(
            h2("https://example.com/a", &["Example.COM"]),
            host("example.com")
        );
        refused(h2("https://example.com/a", &["other.com"]), "differs");
        refused(h2("https://a/a", &["a", "a"]), "more than one");
        refused(h2("/a", &[]), "neither :authority nor a Host");
        refused(h2("https://user@example.com/a", &[]), "not a valid host");
    }

    #[test]
    fn own_errors_are_logged_ten_a_second_at_most_and_the_rest_counted() {
        let mut said = Said {
            since: None,
            said: 0,
            unsaid: 0,
        };
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        for i in 0..OWN_ERRORS_SAID {
            assert!(matches!(
                said.take(at(u64::from(i))),
                Say::Yes { unsaid: 0 }
            ));
        }
        for i in 0..25 {
            assert!(matches!(said.take(at(100 + i)), Say::No));
        }
        // A new window: said again, with the count of those left out.
        assert!(matches!(said.take(at(1000)), Say::Yes { unsaid: 25 }));
        assert!(matches!(said.take(at(1001)), Say::Yes { unsaid: 0 }));
    }

    #[test]
    fn each_request_has_an_id_kept_from_the_client_when_valid() {
        let ids = paddock_core::request_id::Ids::new("lb1", 0x19a);
        let peer = HeaderValue::from_static("127.0.0.9");
        let id_of = |request: Request<()>| {
            let (parts, ()) = request.into_parts();
            let (head, id) = encode_head(&parts, &peer, None, false, false, &ids);
            let head = String::from_utf8(head).unwrap();
            assert_eq!(head.matches("x-request-id: ").count(), 1, "{head}");
            assert!(
                head.contains(&format!("x-request-id: {}\r\n", &head[id.clone()])),
                "{head}"
            );
            head[id].to_string()
        };
        assert_eq!(id_of(Request::get("/a").body(()).unwrap()), "lb1-19a-0");
        assert_eq!(id_of(Request::get("/a").body(()).unwrap()), "lb1-19a-1");
        let sent = |value: &str| {
            Request::get("/a")
                .header("x-request-id", value)
                .body(())
                .unwrap()
        };
        assert_eq!(id_of(sent("edge-7f3e9c1a")), "edge-7f3e9c1a");
        // Not an id that reads the same in every log: replaced.
        assert_eq!(id_of(sent("two words")), "lb1-19a-2");
        let twice = Request::get("/a")
            .header("x-request-id", "first")
            .header("x-request-id", "second")
            .body(())
            .unwrap();
        assert_eq!(id_of(twice), "first");
    }

    #[test]
    fn a_balancer_serving_https_says_so_and_a_client_cannot_say_otherwise() {
        let request = Request::get("/x")
            .header("x-forwarded-proto", "http")
            .body(())
            .unwrap();
        let head = head_over(request, None, true);
        assert!(head.ends_with("x-forwarded-proto: https\r\n\r\n"), "{head}");
        assert_eq!(head.matches("x-forwarded-proto").count(), 1, "{head}");
    }
}
