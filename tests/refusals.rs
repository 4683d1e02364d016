//! Every kind of bad client gets its own clear refusal, counted by reason,
//! and the controller keeps serving everyone else.

mod harness;

use std::sync::Arc;
use std::time::Duration;

use dicops_proto::{AgentInfo, ApiError, HostHealth, Report};
use harness::{sample, Deployment};
use hyper::{Method, StatusCode};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

fn report(agent: &str, seq: u64) -> Vec<u8> {
    serde_json::to_vec(&Report {
        agent: agent.into(),
        seq,
        instance: "test".into(),
        collected_at: 1.0,
        interval_seconds: 60.0,
        info: AgentInfo {
            version: "test".into(),
            ..AgentInfo::default()
        },
        health: HostHealth::default(),
        report_failures: Default::default(),
        backups: Vec::new(),
        data_url: None,
        data_refusals: Default::default(),
        exports: Vec::new(),
        certificate_expiry_timestamp_seconds: None,
    })
    .expect("json")
}

fn refusal(status: StatusCode, body: &[u8]) -> (StatusCode, String) {
    let error: ApiError = serde_json::from_slice(body).expect("refusals are JSON");
    assert!(!error.error.is_empty());
    (status, error.reason)
}

/// A TLS client that trusts our CA but presents no certificate.
async fn post_without_certificate(d: &Deployment, path: &str) -> (StatusCode, Vec<u8>) {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(d.pki.dir.join("ca.pem")).expect("ca") {
        roots.add(cert.expect("cert")).expect("add");
    }
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", d.port))
        .await
        .expect("connect");
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect("localhost".try_into().expect("name"), tcp)
        .await
        .expect("the handshake itself succeeds without a client certificate");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
        .await
        .expect("http");
    tokio::spawn(conn);
    let request = hyper::Request::builder()
        .method(Method::POST)
        .uri(path)
        .header("host", "localhost")
        .body(http_body_util::Full::new(hyper::body::Bytes::from(report("db01", 1))))
        .expect("request");
    let response = sender.send_request(request).await.expect("response");
    let status = response.status();
    let body = http_body_util::BodyExt::collect(response.into_body())
        .await
        .expect("body")
        .to_bytes();
    (status, body.to_vec())
}

#[test]
fn bad_clients_are_refused_clearly_and_counted() {
    let d = Deployment::new(&[("dc1", &["db01", "app01"])]);
    d.pki.issue(&["--agent", "ghost"]);
    let _controller = d.start_controller();
    let rt = &d.runtime;

    // 1. No client certificate.
    let (status, body) = rt.block_on(post_without_certificate(&d, dicops_proto::REPORT_PATH));
    assert_eq!(
        refusal(status, &body),
        (StatusCode::UNAUTHORIZED, "no_certificate".into())
    );

    // 2. A certificate from another deployment's CA: refused in the handshake.
    let other = harness::Pki::new(&d.path("other"));
    other.issue(&["--agent", "db01"]);
    let mut foreign_files = other.files("agent-db01");
    foreign_files.ca = d.pki.dir.join("ca.pem");
    // Our own sanity check refuses to even load it...
    assert!(dicops_net::TlsReloader::load(foreign_files.clone()).is_err());
    // ...so present it with a hand-built client, as an attacker would.
    let foreign_result = rt.block_on(async {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(&foreign_files.ca).expect("ca") {
            roots.add(cert.expect("cert")).expect("add");
        }
        let chain: Vec<_> = CertificateDer::pem_file_iter(&foreign_files.cert)
            .expect("cert")
            .map(|c| c.expect("c"))
            .collect();
        let key = rustls_pki_types::PrivateKeyDer::from_pem_file(&foreign_files.key).expect("key");
        let config = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .expect("config");
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", d.port))
            .await
            .expect("connect");
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect("localhost".try_into().expect("name"), tcp)
            .await;
        match tls {
            Err(e) => Err(e.to_string()),
            Ok(tls) => {
                // TLS 1.3: the server's verdict arrives with the first read.
                let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                    .await
                    .map_err(|e| e.to_string())?;
                tokio::spawn(conn);
                let request = hyper::Request::get("/healthz")
                    .header("host", "localhost")
                    .body(http_body_util::Empty::<hyper::body::Bytes>::new())
                    .expect("request");
                sender
                    .send_request(request)
                    .await
                    .map(|r| r.status())
                    .map_err(|e| e.to_string())
            }
        }
    });
    assert!(
        foreign_result.is_err(),
        "a foreign certificate got through: {foreign_result:?}"
    );

    // 3. An agent reporting as another agent.
    let mut db01 = d.client("agent-db01");
    let (status, body) = rt
        .block_on(db01.request(Method::POST, dicops_proto::REPORT_PATH, Some(report("app01", 1))))
        .expect("request");
    assert_eq!(
        refusal(status, &body),
        (StatusCode::FORBIDDEN, "identity_mismatch".into())
    );

    // 4. An agent with a valid certificate that is not in the inventory.
    let mut ghost = d.client("agent-ghost");
    let (status, body) = rt
        .block_on(ghost.request(Method::POST, dicops_proto::REPORT_PATH, Some(report("ghost", 1))))
        .expect("request");
    assert_eq!(refusal(status, &body), (StatusCode::FORBIDDEN, "unknown_agent".into()));

    // 5. An oversized body (the limit in this deployment is 64 KiB).
    let big = vec![b' '; 65 * 1024];
    let (status, body) = rt
        .block_on(db01.request(Method::POST, dicops_proto::REPORT_PATH, Some(big)))
        .expect("request");
    assert_eq!(
        refusal(status, &body),
        (StatusCode::PAYLOAD_TOO_LARGE, "body_too_large".into())
    );

    // 6. Malformed JSON.
    let mut db01 = d.client("agent-db01");
    let (status, body) = rt
        .block_on(db01.request(
            Method::POST,
            dicops_proto::REPORT_PATH,
            Some(b"{\"agent\": \"db01\", ".to_vec()),
        ))
        .expect("request");
    assert_eq!(refusal(status, &body), (StatusCode::BAD_REQUEST, "malformed".into()));

    // 7. Roles: an operator cannot report, an agent cannot read the metrics or status.
    let mut operator = d.operator();
    let (status, body) = rt
        .block_on(operator.request(Method::POST, dicops_proto::REPORT_PATH, Some(report("db01", 1))))
        .expect("request");
    assert_eq!(refusal(status, &body), (StatusCode::FORBIDDEN, "wrong_role".into()));
    let (status, body) = rt
        .block_on(db01.request(Method::GET, dicops_proto::STATUS_PATH, None))
        .expect("request");
    assert_eq!(refusal(status, &body), (StatusCode::FORBIDDEN, "wrong_role".into()));

    // 8. A replayed report from the same agent process does not roll state back.
    let (status, _) = rt
        .block_on(db01.request(Method::POST, dicops_proto::REPORT_PATH, Some(report("db01", 5))))
        .expect("request");
    assert_eq!(status, StatusCode::OK);
    let (status, body) = rt
        .block_on(db01.request(Method::POST, dicops_proto::REPORT_PATH, Some(report("db01", 4))))
        .expect("request");
    assert_eq!(refusal(status, &body), (StatusCode::CONFLICT, "stale_report".into()));

    // The controller keeps serving: a good report is accepted, and app01 is up.
    // Its data-port refusals are exported under known reasons only: an
    // agent cannot mint label values.
    let mut app01 = d.client("agent-app01");
    let mut with_refusals: Report = serde_json::from_slice(&report("app01", 1)).expect("report");
    with_refusals.data_refusals = [("wrong_peer", 3), ("made_up_reason", 7), ("also_made_up", 1)]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    let (status, _) = rt
        .block_on(app01.request(
            Method::POST,
            dicops_proto::REPORT_PATH,
            Some(serde_json::to_vec(&with_refusals).expect("json")),
        ))
        .expect("request");
    assert_eq!(status, StatusCode::OK);
    let metrics = d.metrics();
    assert_eq!(sample(&metrics, "dicops_agent_up", &[("agent", "app01")]), Some(1.0));
    let refusals = |reason| {
        sample(
            &metrics,
            "dicops_agent_data_refusals_total",
            &[("agent", "app01"), ("reason", reason)],
        )
    };
    assert_eq!(refusals("wrong_peer"), Some(3.0));
    assert_eq!(refusals("other"), Some(8.0));
    assert!(
        !metrics.contains("made_up_reason"),
        "an unknown reason must not become a label"
    );
    assert_eq!(sample(&metrics, "dicops_reports_accepted_total", &[]), Some(2.0));

    // Every refusal is counted by reason.
    for reason in [
        "no_certificate",
        "identity_mismatch",
        "unknown_agent",
        "body_too_large",
        "malformed",
        "stale_report",
    ] {
        assert_eq!(
            sample(
                &metrics,
                "dicops_requests_rejected_total",
                &[("handler", "report"), ("reason", reason)]
            ),
            Some(1.0),
            "{reason}"
        );
    }
    assert_eq!(
        sample(
            &metrics,
            "dicops_requests_rejected_total",
            &[("handler", "report"), ("reason", "wrong_role")]
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &metrics,
            "dicops_requests_rejected_total",
            &[("handler", "status"), ("reason", "wrong_role")]
        ),
        Some(1.0)
    );
    // The foreign certificate is a TLS failure, told apart from the rest.
    harness::wait_until(Duration::from_secs(5), "handshake failure counted", || {
        (sample(
            &d.metrics(),
            "dicops_tls_handshake_failures_total",
            &[("reason", "unknown_ca")],
        ) == Some(1.0))
        .then_some(())
    });
}

#[test]
fn a_client_that_is_not_tls_at_all_is_counted_and_ignored() {
    use std::io::{Read, Write};
    let d = Deployment::new(&[("dc1", &["db01"])]);
    let _controller = d.start_controller();
    let mut plain = std::net::TcpStream::connect(("127.0.0.1", d.port)).expect("connect");
    plain.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    plain
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("write");
    let mut buf = Vec::new();
    let _ = plain.read_to_end(&mut buf);
    assert!(
        !String::from_utf8_lossy(&buf).contains("dicops_"),
        "metrics leaked over plain HTTP"
    );
    harness::wait_until(Duration::from_secs(5), "protocol failure counted", || {
        let m = d.metrics();
        let total: f64 = ["protocol", "other", "eof"]
            .iter()
            .filter_map(|r| sample(&m, "dicops_tls_handshake_failures_total", &[("reason", r)]))
            .sum();
        (total >= 1.0).then_some(())
    });
}
