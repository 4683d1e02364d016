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

fn respond(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
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
        Err(e) => respond(StatusCode::INTERNAL_SERVER_ERROR, "text/plain", e.to_string()),
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
fn refuse_identity(shared: &Shared, handler: &'static str, peer: &Peer, what: &str) -> Response<Full<Bytes>> {
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

/// Every endpoint, parsed from the path.
#[derive(Debug, Clone, PartialEq)]
enum Route {
    Healthz,
    Readyz,
    Metrics,
    Report,
    Status,
    Tasks,
    Results,
    Jobs,
    JobAction(String, JobAction),
    Run(i64),
    Reload,
    Backups,
    Audit,
    Progress,
    Other,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum JobAction {
    Run,
    Pause,
    Resume,
    History,
}

impl Route {
    fn parse(path: &str) -> Route {
        match path {
            "/healthz" => return Route::Healthz,
            "/readyz" => return Route::Readyz,
            "/metrics" => return Route::Metrics,
            dicops_proto::REPORT_PATH => return Route::Report,
            dicops_proto::STATUS_PATH => return Route::Status,
            dicops_proto::TASKS_PATH => return Route::Tasks,
            dicops_proto::RESULTS_PATH => return Route::Results,
            dicops_proto::JOBS_PATH => return Route::Jobs,
            dicops_proto::RELOAD_PATH => return Route::Reload,
            dicops_proto::BACKUPS_PATH => return Route::Backups,
            dicops_proto::AUDIT_PATH => return Route::Audit,
            dicops_proto::PROGRESS_PATH => return Route::Progress,
            _ => {}
        }
        if let Some(rest) = path
            .strip_prefix(dicops_proto::JOBS_PATH)
            .and_then(|r| r.strip_prefix('/'))
        {
            if let Some((job, action)) = rest.split_once('/') {
                let action = match action {
                    "run" => JobAction::Run,
                    "pause" => JobAction::Pause,
                    "resume" => JobAction::Resume,
                    "runs" => JobAction::History,
                    _ => return Route::Other,
                };
                if dicops_proto::is_valid_id(job) {
                    return Route::JobAction(job.to_string(), action);
                }
            }
        }
        if let Some(id) = path
            .strip_prefix(dicops_proto::RUNS_PATH)
            .and_then(|r| r.strip_prefix('/'))
        {
            if let Ok(id) = id.parse() {
                return Route::Run(id);
            }
        }
        Route::Other
    }

    /// The bounded `handler` label.
    fn handler(&self) -> &'static str {
        match self {
            Route::Healthz => "healthz",
            Route::Readyz => "readyz",
            Route::Metrics => "metrics",
            Route::Report => "report",
            Route::Status => "status",
            Route::Tasks => "tasks",
            Route::Results => "results",
            Route::Jobs => "jobs",
            Route::JobAction(_, JobAction::History) => "job_history",
            Route::JobAction(..) => "job_action",
            Route::Run(_) => "run",
            Route::Reload => "reload",
            Route::Backups => "backups",
            Route::Audit => "audit",
            Route::Progress => "progress",
            Route::Other => "other",
        }
    }

    fn method(&self) -> Method {
        match self {
            Route::Report | Route::Results | Route::Reload | Route::Progress => Method::POST,
            Route::JobAction(_, JobAction::History) => Method::GET,
            Route::JobAction(..) => Method::POST,
            _ => Method::GET,
        }
    }
}

fn is_agent(identity: &Identity) -> bool {
    matches!(identity, Identity::Agent(_))
}

/// Routes one request; returns the handler label and the response.
pub async fn route(req: Request<Incoming>, peer: &Peer, shared: &Shared) -> (&'static str, Response<Full<Bytes>>) {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    let route = Route::parse(&path);
    let handler = route.handler();
    if route == Route::Other {
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
    let expected = route.method();
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
    let operator_only = !matches!(
        route,
        Route::Healthz | Route::Readyz | Route::Report | Route::Tasks | Route::Results | Route::Progress
    );
    if operator_only {
        if let Some(refusal) = authorize(shared, handler, peer, operator_or_controller, &path) {
            return (handler, refusal);
        }
    }
    if matches!(route, Route::Tasks | Route::Results | Route::Progress) {
        if let Some(refusal) = authorize(shared, handler, peer, is_agent, &path) {
            return (handler, refusal);
        }
    }
    let response = match route {
        Route::Healthz => respond(StatusCode::OK, "text/plain", "ok\n"),
        Route::Readyz => {
            if shared.ready.load(std::sync::atomic::Ordering::Relaxed) {
                respond(StatusCode::OK, "text/plain", "ready\n")
            } else {
                respond(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "starting\n")
            }
        }
        Route::Metrics => respond(StatusCode::OK, PROMETHEUS_TEXT, crate::render_metrics(shared)),
        Route::Status => json(StatusCode::OK, &shared.state.status(now_unix())),
        Route::Report => report(req, peer, shared).await,
        Route::Tasks => tasks(&req, peer, shared).await,
        Route::Results => results(req, peer, shared).await,
        Route::Progress => progress(req, peer, shared).await,
        Route::Backups => json(StatusCode::OK, &crate::backups_view(shared)),
        Route::Audit => json(
            StatusCode::OK,
            &crate::audit_view(shared, &shared.scheduler.job_metrics()),
        ),
        Route::Jobs => match shared.scheduler.jobs() {
            Ok(jobs) => json(StatusCode::OK, &jobs),
            Err(e) => internal(shared, handler, peer, e),
        },
        Route::JobAction(job, action) => job_action(shared, handler, peer, &job, action, req.uri().query()),
        Route::Run(id) => match shared.scheduler.run(id) {
            Ok(Some(run)) => json(StatusCode::OK, &run),
            Ok(None) => refuse(
                shared,
                handler,
                peer,
                StatusCode::NOT_FOUND,
                "unknown_run",
                format!("no run {id}"),
            ),
            Err(e) => internal(shared, handler, peer, e),
        },
        Route::Reload => {
            audit(shared, peer, "reload", "config", "");
            match crate::reload(shared) {
                Ok(()) => json(StatusCode::OK, &serde_json::json!({"reloaded": true})),
                Err(e) => refuse(
                    shared,
                    handler,
                    peer,
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "invalid_config",
                    e.to_string(),
                ),
            }
        }
        Route::Other => respond(StatusCode::NOT_FOUND, "text/plain", ""),
    };
    (handler, response)
}

fn internal(
    shared: &Shared,
    handler: &'static str,
    peer: &Peer,
    error: impl std::fmt::Display,
) -> Response<Full<Bytes>> {
    tracing::error!(handler, %error, "internal error");
    refuse(
        shared,
        handler,
        peer,
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        error.to_string(),
    )
}

/// Records an operator action: who, with which certificate, did what.
fn audit(shared: &Shared, peer: &Peer, action: &str, target: &str, detail: &str) {
    let who = peer
        .identity
        .as_ref()
        .map(|i| i.to_string())
        .unwrap_or_else(|| "anonymous".into());
    if let Err(e) =
        shared
            .scheduler
            .store()
            .audit(&who, peer.cert_serial.as_deref(), action, target, detail, now_unix())
    {
        tracing::error!(error = %e, "cannot write the audit log");
    }
    tracing::info!(%who, action, target, "operator action");
}

fn job_action(
    shared: &Shared,
    handler: &'static str,
    peer: &Peer,
    job: &str,
    action: JobAction,
    query: Option<&str>,
) -> Response<Full<Bytes>> {
    use crate::scheduler::SchedulerError;
    let scheduler = &shared.scheduler;
    let result = match action {
        JobAction::Run => {
            audit(shared, peer, "run", job, "");
            scheduler
                .run_now(job, &shared.metrics, chrono::Utc::now())
                .map(|run_id| json(StatusCode::ACCEPTED, &dicops_proto::RunStarted { run_id }))
        }
        JobAction::Pause | JobAction::Resume => {
            let paused = action == JobAction::Pause;
            audit(shared, peer, if paused { "pause" } else { "resume" }, job, "");
            scheduler
                .set_paused(job, paused)
                .map(|()| json(StatusCode::OK, &serde_json::json!({"job": job, "paused": paused})))
        }
        JobAction::History => {
            let limit = query
                .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("limit=")))
                .and_then(|v| v.parse().ok())
                .unwrap_or(20u32)
                .min(1000);
            scheduler.history(job, limit).map(|runs| json(StatusCode::OK, &runs))
        }
    };
    match result {
        Ok(response) => response,
        Err(e @ SchedulerError::UnknownJob(_)) => {
            refuse(shared, handler, peer, StatusCode::NOT_FOUND, e.reason(), e.to_string())
        }
        Err(e @ SchedulerError::AlreadyRunning { .. }) => {
            refuse(shared, handler, peer, StatusCode::CONFLICT, e.reason(), e.to_string())
        }
        Err(e) => internal(shared, handler, peer, e),
    }
}

/// Long poll of an agent for its tasks: `?wait=SECONDS` (at most 30).
async fn tasks(req: &Request<Incoming>, peer: &Peer, shared: &Shared) -> Response<Full<Bytes>> {
    let Some(Identity::Agent(agent)) = &peer.identity else {
        return refuse_identity(shared, "tasks", peer, "the tasks endpoint");
    };
    if shared.state.config().site_of(agent).is_none() {
        return refuse(
            shared,
            "tasks",
            peer,
            StatusCode::FORBIDDEN,
            "unknown_agent",
            format!("agent {agent:?} is not in the controller's inventory"),
        );
    }
    let query = req.uri().query().unwrap_or("");
    let param = |name: &str| {
        query
            .split('&')
            .find_map(|kv| kv.strip_prefix(name).and_then(|v| v.strip_prefix('=')))
    };
    let wait = param("wait").and_then(|v| v.parse::<u64>().ok()).unwrap_or(25).min(30);
    // The runs the agent holds; absent from an older agent: no reconciling.
    if let Some(held) = param("held") {
        let held: Vec<i64> = held.split(',').filter_map(|id| id.parse().ok()).collect();
        if let Err(e) = shared
            .scheduler
            .reconcile(agent, &held, chrono::Utc::now(), &shared.metrics)
        {
            return internal(shared, "tasks", peer, e);
        }
    }
    match shared.scheduler.poll(agent, std::time::Duration::from_secs(wait)).await {
        Ok(poll) => json(StatusCode::OK, &poll),
        Err(e) => internal(shared, "tasks", peer, e),
    }
}

/// An agent's result of a task, acknowledged once durably recorded.
async fn results(req: Request<Incoming>, peer: &Peer, shared: &Shared) -> Response<Full<Bytes>> {
    const H: &str = "results";
    let Some(Identity::Agent(agent)) = peer.identity.clone() else {
        return refuse_identity(shared, H, peer, "the results endpoint");
    };
    let result: dicops_proto::TaskResult = match read_json(req, peer, shared, H, "result").await {
        Ok(result) => result,
        Err(refusal) => return *refusal,
    };
    // The result is committed with an fsync before we acknowledge it: let
    // the runtime move other connections off this thread meanwhile.
    let recorded = tokio::task::block_in_place(|| {
        shared
            .scheduler
            .record_result(&agent, &result, &shared.metrics, chrono::Utc::now())
    });
    match recorded {
        Ok(recorded) => json(
            StatusCode::OK,
            &dicops_proto::ResultAck {
                run_id: result.run_id,
                recorded,
            },
        ),
        Err(e @ crate::scheduler::SchedulerError::NotYourRun { .. }) => {
            refuse(shared, H, peer, StatusCode::FORBIDDEN, e.reason(), e.to_string())
        }
        Err(e) => internal(shared, H, peer, e),
    }
}

/// A running task's progress (best effort for the agent; kept in memory).
async fn progress(req: Request<Incoming>, peer: &Peer, shared: &Shared) -> Response<Full<Bytes>> {
    const H: &str = "progress";
    let Some(Identity::Agent(agent)) = peer.identity.clone() else {
        return refuse_identity(shared, H, peer, "the progress endpoint");
    };
    let progress: dicops_proto::RunProgress = match read_json(req, peer, shared, H, "progress").await {
        Ok(progress) => progress,
        Err(refusal) => return *refusal,
    };
    match shared.scheduler.set_progress(&agent, progress) {
        Ok(bandwidth) => json(StatusCode::OK, &dicops_proto::ProgressAck { bandwidth }),
        Err(e) => refuse(shared, H, peer, StatusCode::FORBIDDEN, e.reason(), e.to_string()),
    }
}

/// Reads and decodes an agent's JSON body within the size limit, or says
/// why not. A moderately oversized body is drained so the agent can read
/// the refusal; a huge one is refused at once and the connection closed.
async fn read_json<T: serde::de::DeserializeOwned>(
    req: Request<Incoming>,
    peer: &Peer,
    shared: &Shared,
    handler: &'static str,
    what: &str,
) -> Result<T, Box<Response<Full<Bytes>>>> {
    let limit = shared.state.config().max_request_bytes;
    let drain_limit = limit.saturating_mul(4).saturating_add(1 << 20);
    let too_large = |size: String| {
        Box::new(refuse(
            shared,
            handler,
            peer,
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("{what}{size} is larger than the limit of {limit} bytes"),
        ))
    };
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(declared) = declared.filter(|n| *n > limit) {
        if declared <= drain_limit {
            dicops_net::body::drain(req.into_body(), drain_limit).await;
        }
        return Err(too_large(format!(" of {declared} bytes")));
    }
    let mut body = req.into_body();
    let bytes = match dicops_net::body::read_limited(&mut body, limit).await {
        Ok(bytes) => bytes,
        Err(dicops_net::body::BodyError::TooLarge { .. }) => {
            dicops_net::body::drain(body, drain_limit).await;
            return Err(too_large(String::new()));
        }
        Err(e) => {
            return Err(Box::new(refuse(
                shared,
                handler,
                peer,
                StatusCode::BAD_REQUEST,
                "malformed",
                e.to_string(),
            )))
        }
    };
    serde_json::from_slice(&bytes).map_err(|e| {
        Box::new(refuse(
            shared,
            handler,
            peer,
            StatusCode::BAD_REQUEST,
            "malformed",
            format!("{what} is not valid JSON of the expected shape: {e}"),
        ))
    })
}

async fn report(req: Request<Incoming>, peer: &Peer, shared: &Shared) -> Response<Full<Bytes>> {
    const H: &str = "report";
    let Some(Identity::Agent(agent_id)) = peer.identity.clone() else {
        return refuse_identity(shared, H, peer, "the report endpoint");
    };
    let report: Report = match read_json(req, peer, shared, H, "report").await {
        Ok(report) => report,
        Err(refusal) => return *refusal,
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
    let data_url = report.data_url.clone();
    match shared.state.accept_report(report, peer.cert_not_after, now_unix()) {
        Ok(site) => {
            shared.scheduler.note_data_url(&agent_id, data_url.as_deref());
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
