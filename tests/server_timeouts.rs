//! Half-sent requests time out (headers: the connection closes; bodies: a 408 with the error
//! body), and the requests hyper itself cannot parse get OpenAI-style JSON error bodies.

mod server_support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use serde_json::Value;
use server_support::start;

/// Sends `bytes` on a fresh connection and reads until the server closes it (30 s at most).
fn exchange(addr: std::net::SocketAddr, bytes: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    stream.write_all(bytes).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("the server kept the connection open: {e} (got {:?})", String::from_utf8_lossy(&out)),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The status and JSON error of a raw response.
fn error_of(response: &str) -> (u16, Value) {
    let status = response.get(9..12).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("no status: {response:?}"));
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    assert!(head.to_ascii_lowercase().contains("content-type: application/json"), "{response}");
    let body: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {response}"));
    (status, body["error"].clone())
}

#[test]
fn half_sent_requests_time_out() {
    let s = start(|c| {
        c.header_timeout_s = 1;
        c.body_timeout_s = 1;
    });
    let addr = s.server.addr;
    // headers that never end: closed without an answer
    let response = exchange(addr, b"GET /health HTTP/1.1\r\nHost: localhost\r\nX-Slow: ");
    assert_eq!(response, "", "{response}");
    // a body shorter than announced: 408 with the error body
    let short = b"POST /v1/images/generations HTTP/1.1\r\nHost: localhost\r\ncontent-type: application/json\r\ncontent-length: 200\r\n\r\n{\"prompt\": \"x\"";
    let (status, error) = error_of(&exchange(addr, short));
    assert_eq!((status, error["code"].as_str()), (408, Some("request_timeout")), "{error}");
    let form = b"POST /v1/images/edits HTTP/1.1\r\nHost: localhost\r\ncontent-type: multipart/form-data; boundary=b\r\ncontent-length: 500\r\n\r\n--b\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\nx\r\n--b\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n\r\n\x89PNG";
    let (status, error) = error_of(&exchange(addr, form));
    assert_eq!((status, error["code"].as_str()), (408, Some("request_timeout")), "{error}");
    // an adapter upload (streamed to a file) that stalls: the same 408
    let upload = b"PUT /v1/adapters/stalled HTTP/1.1\r\nHost: localhost\r\ncontent-length: 1000\r\n\r\nsafetensors";
    let (status, error) = error_of(&exchange(addr, upload));
    assert_eq!((status, error["code"].as_str()), (408, Some("request_timeout")), "{error}");
    s.assert_still_serving();
}

#[test]
fn unparsable_requests_get_json_errors() {
    let s = start(|_| {});
    let addr = s.server.addr;
    let (status, error) = error_of(&exchange(addr, b"G\x01T / HTTP/1.1\r\nHost: localhost\r\n\r\n"));
    assert_eq!((status, error["code"].as_str(), error["type"].as_str()), (400, Some("malformed_request"), Some("invalid_request_error")));
    let mut many = b"GET /health HTTP/1.1\r\nHost: localhost\r\n".to_vec();
    for i in 0..150 {
        many.extend(format!("X-Header-{i}: {i}\r\n").as_bytes());
    }
    many.extend(b"\r\n");
    let (status, error) = error_of(&exchange(addr, &many));
    assert_eq!((status, error["code"].as_str()), (431, Some("headers_too_large")), "{error}");
    let huge = format!("GET /health HTTP/1.1\r\nHost: localhost\r\nX-Big: {}\r\n\r\n", "a".repeat(600 * 1024));
    let (status, _) = error_of(&exchange(addr, huge.as_bytes()));
    assert_eq!(status, 431);
    // well-formed requests on a connection are unaffected
    let ok = exchange(addr, b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    assert!(ok.starts_with("HTTP/1.1 200") && ok.ends_with(r#"{"status":"ok"}"#), "{ok}");
    s.assert_still_serving();
}
