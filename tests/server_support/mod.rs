//! Helpers for the server integration tests: a real server on a loopback port over the fixture
//! model, with a temporary adapters folder seeded from the fixture adapters.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::Engine as _;
use reqwest::blocking::{Client, Response};
use reqwest::StatusCode;
use sdserve::server::{BackgroundServer, ServerConfig};
use serde_json::{json, Value};

pub const FIXTURE_ADAPTERS: [&str; 3] = ["probe_diffusers", "probe_kohya", "other_diffusers"];

#[path = "../common/mod.rs"]
pub mod common;
pub use common::fixture_dir;

pub fn fixture_lora(name: &str) -> PathBuf {
    fixture_dir()
        .join("loras")
        .join(format!("{name}.safetensors"))
}

pub struct TestServer {
    pub server: BackgroundServer,
    pub root: PathBuf,
    pub adapters_dir: PathBuf,
    pub client: Client,
    pub key: Option<String>,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if !self.root.as_os_str().is_empty() {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }
}

/// Starts a server on 127.0.0.1:0 with the fixture model; `customize` adjusts the config.
pub fn start(customize: impl FnOnce(&mut ServerConfig)) -> TestServer {
    let root = std::env::temp_dir().join(format!("sdserve-test-{}", uuid::Uuid::new_v4().simple()));
    let adapters_dir = root.join("adapters");
    std::fs::create_dir_all(&adapters_dir).unwrap();
    for name in FIXTURE_ADAPTERS {
        std::fs::copy(
            fixture_lora(name),
            adapters_dir.join(format!("{name}.safetensors")),
        )
        .unwrap();
    }
    let mut config = ServerConfig::for_model(fixture_dir());
    config.adapters_dir = adapters_dir.clone();
    config.data_dir = root.join("data");
    config.defaults.default_steps = 2;
    customize(&mut config);
    start_with(root, config)
}

fn start_with(root: PathBuf, config: ServerConfig) -> TestServer {
    let adapters_dir = config.adapters_dir.clone();
    let key = config.api_key.clone();
    let server = sdserve::server::spawn(config).expect("server starts");
    server
        .wait_ready(Duration::from_secs(120))
        .expect("model loads");
    let client = Client::builder()
        .timeout(Duration::from_secs(300))
        .build()
        .unwrap();
    TestServer {
        server,
        root,
        adapters_dir,
        client,
        key,
    }
}

impl TestServer {
    /// Stops this server and starts a new one on the same folders and database.
    pub fn restart(mut self) -> TestServer {
        let root = std::mem::take(&mut self.root);
        let config = (*self.server.state.config).clone();
        drop(self);
        start_with(root, config)
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.server.url())
    }

    fn auth(&self, rb: reqwest::blocking::RequestBuilder) -> reqwest::blocking::RequestBuilder {
        match &self.key {
            Some(k) => rb.bearer_auth(k),
            None => rb,
        }
    }

    /// GET with one extra header.
    pub fn auth_get_with(&self, path: &str, header: &str, value: &str) -> Response {
        self.auth(self.client.get(self.url(path))).header(header, value).send().unwrap()
    }

    pub fn get(&self, path: &str) -> Response {
        self.auth(self.client.get(self.url(path))).send().unwrap()
    }

    pub fn post_json(&self, path: &str, body: &Value) -> Response {
        self.auth(self.client.post(self.url(path)))
            .json(body)
            .send()
            .unwrap()
    }

    pub fn post_raw(&self, path: &str, body: &'static str) -> Response {
        self.auth(self.client.post(self.url(path)))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .unwrap()
    }

    pub fn put_bytes(&self, path: &str, bytes: Vec<u8>) -> Response {
        self.auth(self.client.put(self.url(path)))
            .body(bytes)
            .send()
            .unwrap()
    }

    pub fn delete(&self, path: &str) -> Response {
        self.auth(self.client.delete(self.url(path)))
            .send()
            .unwrap()
    }

    /// POST /v1/images/generations, asserting 200.
    pub fn generate(&self, body: Value) -> Value {
        let resp = self.post_json("/v1/images/generations", &body);
        let status = resp.status();
        let text = resp.text().unwrap();
        assert_eq!(status, StatusCode::OK, "generation failed: {text}");
        serde_json::from_str(&text).unwrap()
    }

    /// The b64 of the first image of a generation.
    pub fn image_b64(&self, body: Value) -> String {
        self.generate(body)["data"][0]["b64_json"]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// Submits an async job, asserting 202.
    pub fn submit(&self, body: Value) -> Value {
        let resp = self.post_json("/v1/images/jobs", &body);
        let status = resp.status();
        let text = resp.text().unwrap();
        assert_eq!(status, StatusCode::ACCEPTED, "submission failed: {text}");
        serde_json::from_str(&text).unwrap()
    }

    pub fn job(&self, id: &str) -> Value {
        let resp = self.get(&format!("/v1/images/jobs/{id}"));
        assert_eq!(resp.status(), StatusCode::OK);
        resp.json().unwrap()
    }

    /// Polls a job until `pred` holds (fails after two minutes, to never hang).
    pub fn wait_job(&self, id: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let start = Instant::now();
        loop {
            let job = self.job(id);
            if pred(&job) {
                return job;
            }
            assert!(!common::terminal(&job), "job {id} ended before becoming {what}: {job}");
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "job {id} never became {what}: {job}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn wait_terminal(&self, id: &str) -> Value {
        self.wait_job(id, "terminal", common::terminal)
    }

    /// Still healthy and still generating.
    pub fn assert_still_serving(&self) {
        assert_eq!(self.get("/health").status(), StatusCode::OK);
        let r =
            self.generate(json!({"prompt": "still alive", "size": "32x32", "steps": 1, "seed": 1}));
        assert_eq!(r["data"].as_array().unwrap().len(), 1);
    }
}

/// Asserts the status and the OpenAI error envelope; returns the `error` object.
pub fn assert_error(resp: Response, status: StatusCode) -> Value {
    let got = resp.status();
    let retry_after = resp.headers().get("retry-after").cloned();
    let text = resp.text().unwrap();
    assert_eq!(got, status, "unexpected status, body: {text}");
    let body: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("error body is not JSON ({e}): {text}"));
    let err = &body["error"];
    assert!(
        err["message"].as_str().is_some_and(|m| !m.is_empty()),
        "error.message missing: {text}"
    );
    assert!(err["type"].as_str().is_some(), "error.type missing: {text}");
    assert!(
        err.get("param").is_some() && err.get("code").is_some(),
        "error.param / error.code missing: {text}"
    );
    if status == StatusCode::TOO_MANY_REQUESTS {
        let secs: u64 = retry_after
            .expect("Retry-After on 429")
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!(secs >= 1);
    }
    err.clone()
}

/// Decodes a base64 image, returning its format and size.
pub fn decode_image(b64: &str) -> (image::ImageFormat, u32, u32) {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .expect("valid base64");
    let format = image::guess_format(&bytes).expect("a known image format");
    let img = image::load_from_memory(&bytes).expect("decodable image");
    (format, img.width(), img.height())
}

pub fn copy_adapter(from: &str, to_dir: &Path, name: &str) {
    std::fs::copy(
        fixture_lora(from),
        to_dir.join(format!("{name}.safetensors")),
    )
    .unwrap();
}

/// One part of a `multipart/form-data` body: a text field, or a file with its bytes.
#[derive(Clone, Copy)]
pub enum Part<'a> {
    Text(&'a str, &'a str),
    File(&'a str, &'a str, &'a [u8]),
}

/// A `multipart/form-data` body as `(content type, bytes)`, built by hand so a test can send
/// exactly what a client sends.
pub fn multipart(parts: &[Part]) -> (String, Vec<u8>) {
    let boundary = "sdserve-test-boundary-7f3a";
    let mut body = Vec::new();
    for part in parts {
        body.extend(format!("--{boundary}\r\n").as_bytes());
        match part {
            Part::Text(name, value) => {
                body.extend(format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n").as_bytes());
            }
            Part::File(name, filename, bytes) => {
                body.extend(
                    format!("Content-Disposition: form-data; name=\"{name}\"; filename=\"{filename}\"\r\nContent-Type: application/octet-stream\r\n\r\n")
                        .as_bytes(),
                );
                body.extend(*bytes);
                body.extend(b"\r\n");
            }
        }
    }
    body.extend(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

impl TestServer {
    /// POSTs a multipart form.
    pub fn post_form(&self, path: &str, parts: &[Part]) -> Response {
        let (content_type, body) = multipart(parts);
        self.auth(self.client.post(self.url(path)))
            .header("content-type", content_type)
            .body(body)
            .send()
            .unwrap()
    }
}

/// A fixture file under `reference/edits/`.
pub fn edit_input(name: &str) -> Vec<u8> {
    std::fs::read(fixture_dir().join("reference/edits").join(name)).unwrap()
}
