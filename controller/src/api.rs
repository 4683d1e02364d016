//! HTTP handlers: who may call what, and what they get.

use dicops_proto::{ApiError, Identity, Report, ReportAck};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};

use crate::server::Peer;
use crate::state::ReportRefusal;
use crate::{now_unix, Shared};

const JSON: &str = "application/json";
/// The Prometheus text exposition format.
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

fn respond(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

fn json<T: serde::Serialize>(status: StatusCode, value: &T) -> Response<Full<Bytes>> {
    match serde_json::to_vec(value) {
        Ok(body) => respond(status, JSON, body),
        Err(e) => respond(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            e.to_string(),
        ),
    }
}

/// A refusal: counted by handler and reason, logged, and explained to the
/// caller in a JSON body.
fn refuse(
    shared: &Shared,
    handler: &'static str,
    peer: &Peer,
    status: StatusCode,
    reason: &'static str,
    error: String,
) -> Response<Full<Bytes>> {
    shared
        .metrics
        .requests_rejected
        .with_label_values(&[handler, reason])
        .inc();
    let who = peer
        .identity
        .as_ref()
        .map(|i| i.to_string())
        .unwrap_or_else(|| "anonymous".into());
    tracing::warn!(peer = %peer.addr, identity = %who, handler, reason, %error, "request refused");
    json(
        status,
        &ApiError {
            reason: reason.to_string(),
            error,
        },
    )
}

/// The refusal for a caller whose certificate does not allow `what`.
fn refuse_identity(
    shared: &Shared,
    handler: &'static str,
    peer: &Peer,
    what: &str,
) -> Response<Full<Bytes>> {
    match &peer.identity {
        None => refuse(
            shared,
            handler,
            peer,
            StatusCode::UNAUTHORIZED,
            "no_certificate",
            format!("{what} requires a client certificate issued by this deployment's CA"),
        ),
        Some(identity) => refuse(
            shared,
            handler,
            peer,
            StatusCode::FORBIDDEN,
            "wrong_role",
            format!("{identity} may not use {what}"),
        ),
    }
}

/// The refusal for a caller without a certificate of an allowed role, if any.
fn authorize(
    shared: &Shared,
    handler: &'static str,
    peer: &Peer,
    allowed: fn(&Identity) -> bool,
    what: &str,
) -> Option<Response<Full<Bytes>>> {
    match &peer.identity {
        Some(identity) if allowed(identity) => None,
        _ => Some(refuse_identity(shared, handler, peer, what)),
    }
}

fn operator_or_controller(identity: &Identity) -> bool {
    matches!(identity, Identity::Operator(_) | Identity::Controller)
}

/// Routes one request; returns the handler label and the response.
pub async fn route(
    req: Request<Incoming>,
    peer: &Peer,
    shared: &Shared,
) -> (&'static str, Response<Full<Bytes>>) {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    let handler: &'static str = match path.as_str() {
        "/healthz" => "healthz",
        "/readyz" => "readyz",
        "/metrics" => "metrics",
        dicops_proto::REPORT_PATH => "report",
        dicops_proto::STATUS_PATH => "status",
        _ => "other",
    };
    let expected = match handler {
        "report" => Method::POST,
        _ => Method::GET,
    };
    if handler == "other" {
        let response = refuse(
            shared,
            handler,
            peer,
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no such endpoint: {path}"),
        );
        return (handler, response);
    }
    if method != expected && !(method == Method::HEAD && expected == Method::GET) {
        let response = refuse(
            shared,
            handler,
            peer,
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            format!("{path} accepts {expected}, not {method}"),
        );
        return (handler, response);
    }
    let response = match handler {
        "healthz" => respond(StatusCode::OK, "text/plain", "ok\n"),
        "readyz" => {
            if shared.ready.load(std::sync::atomic::Ordering::Relaxed) {
                respond(StatusCode::OK, "text/plain", "ready\n")
            } else {
                respond(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "starting\n")
            }
        }
        "metrics" => match authorize(shared, handler, peer, operator_or_controller, "/metrics") {
            Some(refusal) => refusal,
            None => respond(
                StatusCode::OK,
                PROMETHEUS_TEXT,
                crate::render_metrics(shared),
            ),
        },
        "status" => match authorize(
            shared,
            handler,
            peer,
            operator_or_controller,
            "the status API",
        ) {
            Some(refusal) => refusal,
            None => json(StatusCode::OK, &shared.state.status(now_unix())),
        },
        _ => report(req, peer, shared).await,
    };
    (handler, response)
}

async fn report(req: Request<Incoming>, peer: &Peer, shared: &Shared) -> Response<Full<Bytes>> {
    const H: &str = "report";
    let Some(Identity::Agent(agent_id)) = peer.identity.clone() else {
        return refuse_identity(shared, H, peer, "the report endpoint");
    };
    let limit = shared.state.config().max_request_bytes;
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    // A moderately oversized body is drained so the agent can read the
    // refusal; a huge one is refused at once and the connection closed.
    let drain_limit = limit.saturating_mul(4).saturating_add(1 << 20);
    if let Some(declared) = declared.filter(|n| *n > limit) {
        if declared <= drain_limit {
            dicops_net::body::drain(req.into_body(), drain_limit).await;
        }
        return refuse(
            shared,
            H,
            peer,
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("report of {declared} bytes is larger than the limit of {limit} bytes"),
        );
    }
    let mut body = req.into_body();
    let body = match dicops_net::body::read_limited(&mut body, limit).await {
        Ok(body) => body,
        Err(dicops_net::body::BodyError::TooLarge { limit }) => {
            dicops_net::body::drain(body, drain_limit).await;
            return refuse(
                shared,
                H,
                peer,
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!("report is larger than the limit of {limit} bytes"),
            );
        }
        Err(e) => {
            return refuse(
                shared,
                H,
                peer,
                StatusCode::BAD_REQUEST,
                "malformed",
                e.to_string(),
            )
        }
    };
    let report: Report = match serde_json::from_slice(&body) {
        Ok(report) => report,
        Err(e) => {
            return refuse(
                shared,
                H,
                peer,
                StatusCode::BAD_REQUEST,
                "malformed",
                format!("report is not valid JSON of the expected shape: {e}"),
            )
        }
    };
    if report.agent != agent_id {
        return refuse(
            shared,
            H,
            peer,
            StatusCode::FORBIDDEN,
            "identity_mismatch",
            format!(
                "the certificate is for agent {agent_id:?} but the report claims to be from {:?}; an agent may only report as itself",
                report.agent
            ),
        );
    }
    match shared.state.accept_report(report, peer.cert_not_after, now_unix()) {
        Ok(site) => {
            shared.metrics.reports_accepted.inc();
            tracing::debug!(agent = %agent_id, %site, "report accepted");
            json(StatusCode::OK, &ReportAck { accepted: true, site })
        }
        Err(ReportRefusal::UnknownAgent) => refuse(
            shared,
            H,
            peer,
            StatusCode::FORBIDDEN,
            "unknown_agent",
            format!("agent {agent_id:?} is not in the controller's inventory; add it under `agents:` in the controller config"),
        ),
        Err(ReportRefusal::StaleReport) => refuse(
            shared,
            H,
            peer,
            StatusCode::CONFLICT,
            "stale_report",
            "this report is older than one already accepted from the same agent process".into(),
        ),
    }
}
