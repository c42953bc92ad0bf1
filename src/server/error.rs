//! One error type for every failure, rendered as OpenAI's
//! `{"error": {"message", "type", "param", "code"}}` with a matching status.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The error envelope of every non-2xx response.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorResponse {
    pub error: ErrorObject,
}

/// What went wrong.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorObject {
    /// Human-readable description.
    pub message: String,
    /// Error class; follows the HTTP status.
    #[serde(rename = "type")]
    pub kind: ErrorType,
    /// The request field at fault, when there is one (e.g. `size`, `loras[0].name`).
    #[schema(required = true)]
    pub param: Option<String>,
    /// Machine-readable code (e.g. `invalid_value`, `adapter_not_found`, `queue_full`).
    #[schema(required = true)]
    pub code: Option<String>,
}

/// Error classes, one per status family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorType {
    /// 400, 408, 413, 414, 415, 431: the request is malformed, incomplete or out of range.
    InvalidRequestError,
    /// 401: missing or wrong API key.
    AuthenticationError,
    /// 404: no such route, job or adapter.
    NotFoundError,
    /// 409: the resource's state forbids the operation.
    ConflictError,
    /// 429: the queue is full; retry after `Retry-After` seconds.
    RateLimitError,
    /// 500: a bug or an engine failure.
    ServerError,
    /// 503: the model is still loading (or failed to load).
    ServiceUnavailableError,
}

/// An error on its way to becoming a response.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub kind: ErrorType,
    pub message: String,
    pub param: Option<String>,
    pub code: Option<String>,
    /// Seconds for the `Retry-After` header (429 and 503).
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, kind: ErrorType, message: impl Into<String>) -> Self {
        Self {
            status,
            kind,
            message: message.into(),
            param: None,
            code: None,
            retry_after: None,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            ErrorType::InvalidRequestError,
            message,
        )
        .code("invalid_value")
    }

    /// 400 for a value of field `param` outside what the server accepts.
    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        Self::bad_request(message).param(param)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, ErrorType::NotFoundError, message).code("not_found")
    }

    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, ErrorType::ConflictError, message).code("conflict")
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            ErrorType::AuthenticationError,
            message,
        )
        .code("invalid_api_key")
    }

    pub fn payload_too_large(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            ErrorType::InvalidRequestError,
            message,
        )
        .code("payload_too_large")
    }

    /// 408: the client stopped sending the request body.
    pub fn body_timeout() -> Self {
        Self::new(
            StatusCode::REQUEST_TIMEOUT,
            ErrorType::InvalidRequestError,
            "the request body stopped arriving (no data within the body timeout); send it again",
        )
        .code("request_timeout")
    }

    pub fn rate_limited(message: impl Into<String>, retry_after: u64) -> Self {
        let mut e = Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            ErrorType::RateLimitError,
            message,
        )
        .code("queue_full");
        e.retry_after = Some(retry_after.max(1));
        e
    }

    pub fn unavailable(message: impl Into<String>, retry_after: u64) -> Self {
        let mut e = Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorType::ServiceUnavailableError,
            message,
        )
        .code("model_not_ready");
        e.retry_after = Some(retry_after.max(1));
        e
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorType::ServerError,
            message,
        )
        .code("internal_error")
    }

    pub fn param(mut self, param: impl Into<String>) -> Self {
        self.param = Some(param.into());
        self
    }

    pub fn code(mut self, code: impl Into<String>) -> Self {
        self.code = Some(code.into());
        self
    }

    pub fn body(&self) -> ErrorResponse {
        ErrorResponse {
            error: ErrorObject {
                message: self.message.clone(),
                kind: self.kind,
                param: self.param.clone(),
                code: self.code.clone(),
            },
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.status)
    }
}

impl std::error::Error for ApiError {}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::error!(status = %self.status, code = ?self.code, "{}", self.message);
        }
        let mut response = (self.status, axum::Json(self.body())).into_response();
        let headers = response.headers_mut();
        if let Some(secs) = self.retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

/// Unexpected failures (I/O, engine errors surfacing in a handler) are 500s.
impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> Self {
        ApiError::internal(format!("{e:#}"))
    }
}

impl From<tokio::task::JoinError> for ApiError {
    fn from(e: tokio::task::JoinError) -> Self {
        ApiError::internal(format!("background task failed: {e}"))
    }
}

// ---------------------------------------------------------------------------------------------
// Extractor rejections, so that malformed input gets the same envelope as everything else.

use axum::extract::rejection::{BytesRejection, JsonRejection, PathRejection, QueryRejection};

const SERDE_PREFIX: &str = "Failed to deserialize the JSON body into the target type: ";

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        let text = rejection.body_text();
        match rejection {
            JsonRejection::JsonDataError(_) => {
                // "<path>: <serde message>", where the path is "." for the root object.
                let detail = text.strip_prefix(SERDE_PREFIX).unwrap_or(&text);
                let (param, message) = match detail.split_once(": ") {
                    Some((path, rest)) if !path.contains(' ') && path != "." => (
                        Some(path.to_string()),
                        format!("invalid value for `{path}`: {rest}"),
                    ),
                    _ => (
                        None,
                        format!("invalid request body: {}", detail.trim_start_matches(". ")),
                    ),
                };
                let mut e = ApiError::bad_request(message).code("invalid_type");
                e.param = param;
                e
            }
            JsonRejection::JsonSyntaxError(_) => {
                ApiError::bad_request(format!("malformed JSON body: {text}")).code("invalid_json")
            }
            JsonRejection::BytesRejection(b) => ApiError::from(b),
            _ => ApiError::bad_request(text).code("invalid_json"),
        }
    }
}

/// Whether a failure to read a request body was the body timeout (see `server::http`).
pub fn is_body_timeout(error: &(dyn std::error::Error + 'static)) -> bool {
    std::iter::successors(Some(error), |e| e.source()).any(|e| e.is::<tower_http::timeout::TimeoutError>())
}

impl From<BytesRejection> for ApiError {
    fn from(rejection: BytesRejection) -> Self {
        let status = rejection.status();
        if is_body_timeout(&rejection) {
            ApiError::body_timeout()
        } else if status == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::payload_too_large(format!(
                "request body too large: {}",
                rejection.body_text()
            ))
        } else {
            ApiError::bad_request(format!(
                "cannot read request body: {}",
                rejection.body_text()
            ))
            .code("invalid_body")
        }
    }
}

impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> Self {
        ApiError::bad_request(format!("invalid query string: {}", rejection.body_text()))
            .code("invalid_query")
    }
}

impl From<PathRejection> for ApiError {
    fn from(rejection: PathRejection) -> Self {
        ApiError::bad_request(format!("invalid path: {}", rejection.body_text()))
            .code("invalid_path")
    }
}
