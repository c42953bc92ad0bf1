//! `/docs`: the Redoc viewer over `/openapi.json`, served from the binary (no network: no
//! CDN script, no web fonts).

use std::sync::LazyLock;

use axum::http::header;
use axum::response::{Html, IntoResponse, Response};

/// The vendored Redoc bundle (see `assets/redoc/README.md`).
const REDOC: &str = include_str!("../../../assets/redoc/redoc.standalone.js");

/// The bundle's one remote resource, Redocly's attribution logo.
const REMOTE_LOGO: &str = "https://cdn.redoc.ly/redoc/logo-mini.svg";

/// The bundle with the attribution logo inlined (an empty image), so nothing is fetched.
static BUNDLE: LazyLock<String> = LazyLock::new(|| {
    REDOC.replace(REMOTE_LOGO, "data:image/svg+xml,%3Csvg xmlns='http://www.w3.org/2000/svg'/%3E")
});

/// Relative URLs, so the page also works behind a path prefix; system fonts only.
const PAGE: &str = r#"<!DOCTYPE html>
<html>
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>sdserve API</title>
<style>body { margin: 0; padding: 0; }</style>
</head>
<body>
<div id="redoc"></div>
<script src="docs/redoc.standalone.js"></script>
<script>
  var fonts = "system-ui, -apple-system, 'Segoe UI', Roboto, 'Helvetica Neue', Arial, sans-serif";
  Redoc.init("openapi.json", {
    theme: { typography: { fontFamily: fonts, headings: { fontFamily: fonts },
                           code: { fontFamily: "ui-monospace, SFMono-Regular, Menlo, Consolas, monospace" } } }
  }, document.getElementById("redoc"));
</script>
</body>
</html>
"#;

/// The documentation page.
pub async fn page() -> Html<&'static str> {
    Html(PAGE)
}

/// The Redoc script.
pub async fn redoc() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "public, max-age=86400"),
        ],
        BUNDLE.as_str(),
    )
        .into_response()
}
