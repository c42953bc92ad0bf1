//! Serving HTTP/1 connections with hyper: a deadline on each request's headers,
//! an idle deadline on request bodies, graceful shutdown, and OpenAI-style JSON bodies on the
//! 400 / 414 / 431 answers hyper gives itself to requests it cannot parse.

use std::future::Future;
use std::io;
use std::pin::{pin, Pin};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tower::ServiceExt;
use tower_http::timeout::TimeoutBody;

use super::error::{ApiError, ErrorType};

/// How long a client may take over parts of a request.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    /// To send a request's headers, and for an idle kept-alive connection to start its next
    /// request (hyper times the wait for the next head); then the connection is closed.
    pub header: Duration,
    /// Between two pieces of a request body; then the request gets a 408.
    pub body_idle: Duration,
}

/// Serves `router` on `listener` until `shutdown` completes, then lets open connections
/// finish their requests.
pub async fn serve(listener: TcpListener, router: Router, timeouts: Timeouts, shutdown: impl Future<Output = ()>) {
    let graceful = GracefulShutdown::new();
    let mut shutdown = pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // e.g. out of file descriptors: back off instead of spinning
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let body_idle = timeouts.body_idle;
        let service = router
            .clone()
            .map_request(move |req: Request<Incoming>| req.map(|b| Body::new(TimeoutBody::new(body_idle, b))));
        let conn = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(timeouts.header)
            .serve_connection(TokioIo::new(JsonProtocolErrors::new(stream)), TowerToHyperService::new(service));
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!("connection ended: {e}");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// The JSON response for hyper's own answer `head` (status line and headers, no body), if it
/// is one: hyper answers requests it cannot parse with a bodiless 400, 414 or 431 and closes.
fn json_protocol_error(head: &[u8]) -> Option<Vec<u8>> {
    // The status line first: this runs on every write, most of them large response bodies.
    let (status, message, code) = match head.get(..12)? {
        b"HTTP/1.1 400" => (StatusCode::BAD_REQUEST, "malformed HTTP request: the request line or a header cannot be parsed", "malformed_request"),
        b"HTTP/1.1 414" => (StatusCode::URI_TOO_LONG, "the request URI is too long", "uri_too_long"),
        b"HTTP/1.1 431" => (StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, "the request headers are too large (or too many)", "headers_too_large"),
        _ => return None,
    };
    let text = std::str::from_utf8(head).ok()?;
    let empty = "\r\ncontent-length: 0\r\n";
    let at = text.to_ascii_lowercase().find(empty)?;
    if !text.ends_with("\r\n\r\n") {
        return None;
    }
    let body = serde_json::to_string(&ApiError::new(status, ErrorType::InvalidRequestError, message).code(code).body()).ok()?;
    let headers = format!("\r\ncontent-type: application/json\r\ncontent-length: {}\r\n", body.len());
    Some(format!("{}{headers}{}{body}", &text[..at], &text[at + empty.len()..]).into_bytes())
}

/// A connection that gives hyper's bodiless protocol-error answers a JSON body.
struct JsonProtocolErrors<T> {
    io: T,
    /// Rewritten bytes not written yet (hyper was told they were).
    pending: Vec<u8>,
}

impl<T> JsonProtocolErrors<T> {
    fn new(io: T) -> Self {
        Self { io, pending: Vec::new() }
    }
}

impl<T: AsyncWrite + Unpin> JsonProtocolErrors<T> {
    fn poll_pending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.pending.is_empty() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.pending))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.pending.drain(..n);
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for JsonProtocolErrors<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for JsonProtocolErrors<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_pending(cx))?;
        match json_protocol_error(buf) {
            Some(response) => {
                this.pending = response;
                // written or not, hyper's bytes are accounted for; the rest goes on flush
                if let Poll::Ready(Err(e)) = this.poll_pending(cx) {
                    return Poll::Ready(Err(e));
                }
                Poll::Ready(Ok(buf.len()))
            }
            None => Pin::new(&mut this.io).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_pending(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_pending(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hyper_error_heads_get_json_bodies() {
        let head = b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\ndate: Mon, 30 Nov 2026 12:00:00 GMT\r\n\r\n";
        let out = String::from_utf8(json_protocol_error(head).unwrap()).unwrap();
        let (headers, body) = out.split_once("\r\n\r\n").unwrap();
        assert!(headers.starts_with("HTTP/1.1 431 ") && headers.contains("content-type: application/json"), "{out}");
        assert!(headers.contains(&format!("content-length: {}", body.len())) && headers.contains("date: Mon"), "{out}");
        let body: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(body["error"]["code"], "headers_too_large");
        // anything else passes untouched: app responses, bodies, other statuses
        for other in [
            &b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: 42\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
            b"{\"error\": 1}",
            b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n",
        ] {
            assert!(json_protocol_error(other).is_none());
        }
    }
}
