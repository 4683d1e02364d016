//! Talking to a real Prometheus started by a test: plain HTTP on loopback.

use std::io::{Read, Write};
use std::time::Duration;

/// GET `path` from 127.0.0.1:`port`: (status, body), None when nothing answers.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n")?.1.to_string();
    Some((status, body))
}

fn encode(query: &str) -> String {
    query
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The result of an instant query: Err with Prometheus's error.
pub fn query(port: u16, expr: &str) -> Result<Vec<serde_json::Value>, String> {
    let (status, body) = http_get(port, &format!("/api/v1/query?query={}", encode(expr))).ok_or("no answer")?;
    let v: serde_json::Value = serde_json::from_str(&body).map_err(|e| format!("{status}: {e}: {body}"))?;
    if v["status"] != "success" {
        return Err(format!("{status}: {} {}", v["errorType"], v["error"]));
    }
    Ok(match &v["data"]["result"] {
        serde_json::Value::Array(items) => items.clone(),
        // A scalar or a string answers with one value.
        other => vec![other.clone()],
    })
}
