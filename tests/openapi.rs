//! The OpenAPI document validates (openapi-spec-validator, installed from
//! tests/requirements.txt), describes what the server does, follows the server's
//! configuration, and `/docs` works without a network.

mod server_support;

use std::process::Command;

use reqwest::StatusCode;
use serde_json::{json, Value};
use server_support::start;

/// Runs openapi-spec-validator on `document`; fails (never skips) when it is missing.
fn validate(document: &str) {
    let dir = std::env::temp_dir().join(format!("sdserve-openapi-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("openapi.json");
    std::fs::write(&path, document).unwrap();
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let out = Command::new(&python)
        .args(["-m", "openapi_spec_validator"])
        .arg(&path)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {python}: {e} (`pip install -r tests/requirements.txt`)"));
    std::fs::remove_dir_all(&dir).unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && text.contains("OK"), "openapi-spec-validator: {text}");
}

#[test]
fn committed_document_validates_and_describes_the_server() {
    let text = std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("openapi/openapi.json")).unwrap();
    validate(&text);
    let doc: Value = serde_json::from_str(&text).unwrap();
    let paths = &doc["paths"];
    // the events endpoint's query parameters are optional query parameters
    let params = paths["/v1/align/jobs/{id}/events"]["get"]["parameters"].as_array().unwrap();
    for name in ["after", "stream"] {
        let p = params.iter().find(|p| p["name"] == name).unwrap();
        assert_eq!((p["in"].as_str(), p["required"].as_bool()), (Some("query"), Some(false)), "{p}");
    }
    // POST /align is documented, as the same operation as POST /v1/align/jobs
    assert_eq!(paths["/align"]["post"]["requestBody"], paths["/v1/align/jobs"]["post"]["requestBody"]);
    // only b64_json, and the limits the server enforces by default
    let schemas = &doc["components"]["schemas"];
    assert_eq!(schemas["ResponseFormat"]["enum"], json!(["b64_json"]));
    let request = &schemas["ImageGenerationRequest"]["properties"];
    assert_eq!((request["n"]["maximum"].as_u64(), request["steps"]["maximum"].as_u64()), (Some(10), Some(150)));
    assert_eq!(request["loras"]["maxItems"], 8);
    assert_eq!(schemas["AlignRequest"]["properties"]["steps"]["maximum"], 1000);
    // no API key by default: every operation may be called without one
    for (path, item) in paths.as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            if let Some(security) = op.get("security") {
                assert_eq!(security[0], json!({}), "{method} {path}: {security}");
            }
        }
    }
    // server-sent events are typed
    let sse = &paths["/v1/images/jobs/{id}/events"]["get"]["responses"]["200"]["content"]["text/event-stream"];
    assert_eq!(sse["schema"]["$ref"], "#/components/schemas/ImageJobStreamEvent");
    assert_eq!(schemas["ImageJobStreamEvent"]["properties"]["data"]["$ref"], "#/components/schemas/ImageJob");
    let sse = &paths["/v1/align/jobs/{id}/events"]["get"]["responses"]["200"]["content"]["text/event-stream"];
    assert_eq!(sse["schema"]["$ref"], "#/components/schemas/AlignJobStreamEvent");
    // edits: multipart, directly and as a job
    let edit = &paths["/v1/images/edits"]["post"]["requestBody"]["content"];
    assert_eq!(edit["multipart/form-data"]["schema"]["$ref"], "#/components/schemas/ImageEditForm");
    assert_eq!(schemas["ImageEditForm"]["properties"]["image"]["format"], "binary");
    let job = &paths["/v1/images/jobs"]["post"]["requestBody"]["content"];
    assert!(job.get("application/json").is_some() && job.get("multipart/form-data").is_some(), "{job}");
}

#[test]
fn served_document_follows_the_configuration_and_docs_work_offline() {
    let s = start(|c| {
        c.api_key = Some("key".into());
        c.limits.max_n = 3;
        c.limits.max_steps = 40;
    });
    let plain = reqwest::blocking::Client::new();
    let text = plain.get(s.url("/openapi.json")).send().unwrap().text().unwrap();
    validate(&text);
    let doc: Value = serde_json::from_str(&text).unwrap();
    let request = &doc["components"]["schemas"]["ImageGenerationRequest"]["properties"];
    assert_eq!((request["n"]["maximum"].as_u64(), request["steps"]["maximum"].as_u64()), (Some(3), Some(40)));
    assert_eq!(doc["paths"]["/v1/models"]["get"]["security"], json!([{"bearer": []}]), "a key is required");

    // /docs and its script need neither the API key nor any other host
    let page = plain.get(s.url("/docs")).send().unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    let html = page.text().unwrap();
    assert!(html.contains(r#"src="docs/redoc.standalone.js""#) && html.contains(r#""openapi.json""#), "{html}");
    assert!(!html.contains("http://") && !html.contains("https://") && !html.contains("fonts."), "{html}");
    let script = plain.get(s.url("/docs/redoc.standalone.js")).send().unwrap();
    assert_eq!(script.status(), StatusCode::OK);
    assert!(script.headers()["content-type"].to_str().unwrap().starts_with("text/javascript"));
    let js = script.text().unwrap();
    assert!(js.len() > 500_000 && js.contains("Redoc"), "the bundled viewer");
    for remote in ["cdn.redoc.ly", "fonts.googleapis", "unpkg.com", "jsdelivr"] {
        assert!(!js.contains(remote), "the served bundle refers to {remote}");
    }
}
