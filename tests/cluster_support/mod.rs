//! Real components for the multi-process tests and the cluster bench: a PostgreSQL server
//! (the distribution's binaries, `initdb` into a temporary folder, run as an unprivileged user
//! when the tests run as root), an S3-compatible server (`s3s-fs`, from crates.io), and
//! `sdserve serve` processes with their roles. The README's test command (which `.ci/run` runs)
//! installs both programs (`scripts/install-test-deps.sh`); a missing one
//! fails the test with the command that installs it. Everything is stopped when dropped.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use reqwest::blocking::Client;
use serde_json::Value;

#[path = "../common/mod.rs"]
mod common;
pub use common::fixture_dir;
#[allow(unused_imports)] // used by the cluster test and bench, not by every includer
pub use common::terminal;

/// A temporary folder removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(what: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("sdserve-{what}-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn is_root() -> bool {
    std::fs::metadata("/proc/self").map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0).unwrap_or(false)
}

/// `cmd` run as `nobody` when we are root (PostgreSQL refuses to run as root).
fn unprivileged(program: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "nobody", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

fn find_postgres_bin() -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql").map(|r| r.flatten().map(|e| e.path().join("bin")).collect()).unwrap_or_default();
    versions.sort();
    versions
        .into_iter()
        .rev()
        .find(|b| b.join("initdb").is_file())
        .expect("PostgreSQL is not installed: apt-get install -y postgresql (the README's test command does it)")
}

/// A PostgreSQL server on a free loopback port, its data in a temporary folder.
pub struct Postgres {
    pub url: String,
    child: Child,
    _dir: TempDir,
}

impl Postgres {
    pub fn start() -> Self {
        let bin = find_postgres_bin();
        let dir = TempDir::new("pg");
        let data = dir.0.join("data");
        if is_root() {
            let status = Command::new("chown").args(["-R", "nobody"]).arg(&dir.0).status().unwrap();
            assert!(status.success());
        }
        let out = unprivileged(&bin.join("initdb"))
            .args(["-A", "trust", "-U", "sdserve", "-E", "UTF8", "--no-sync", "-D"])
            .arg(&data)
            .output()
            .expect("initdb runs");
        assert!(out.status.success(), "initdb failed: {}", String::from_utf8_lossy(&out.stderr));
        let port = free_port();
        let child = unprivileged(&bin.join("postgres"))
            .arg("-D")
            .arg(&data)
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-k"])
            .arg(&dir.0)
            .args(["-c", "fsync=off", "-c", "max_connections=200"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.0.join("postgres.log")).unwrap())
            .spawn()
            .expect("postgres starts");
        let start = Instant::now();
        wait_listening(port, start, 60, "postgres");
        // Accepting connections is not yet accepting logins: wait for pg_isready.
        while !Command::new(bin.join("pg_isready")).args(["-h", "127.0.0.1", "-p", &port.to_string()]).stdout(Stdio::null()).status().unwrap().success() {
            assert!(start.elapsed() < Duration::from_secs(60), "postgres not ready within 60 s");
            std::thread::sleep(Duration::from_millis(50));
        }
        Self { url: format!("postgres://sdserve@127.0.0.1:{port}/postgres"), child, _dir: dir }
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // SIGTERM-less kill of the postmaster leaves its children to exit on their own.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An S3-compatible server (`s3s-fs`) on a free loopback port with one bucket.
pub struct S3 {
    pub endpoint: String,
    pub bucket: String,
    pub root: PathBuf,
    child: Child,
    _dir: TempDir,
}

pub const S3_KEY: &str = "sdserve-test";
pub const S3_SECRET: &str = "sdserve-test-secret";

fn find_s3s_fs() -> PathBuf {
    let in_cargo = std::env::var_os("CARGO_HOME").map(PathBuf::from).or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo"))).map(|c| c.join("bin/s3s-fs"));
    let on_path = std::env::var_os("PATH").and_then(|p| std::env::split_paths(&p).map(|d| d.join("s3s-fs")).find(|p| p.is_file()));
    on_path
        .or(in_cargo.filter(|p| p.is_file()))
        .expect("s3s-fs is not installed: cargo install --locked s3s-fs@0.14.1 --features binary (the README's test command does it)")
}

impl S3 {
    pub fn start() -> Self {
        let dir = TempDir::new("s3");
        let root = dir.0.join("root");
        let bucket = "adapters".to_string();
        std::fs::create_dir_all(root.join(&bucket)).unwrap();
        let port = free_port();
        let child = Command::new(find_s3s_fs())
            .args(["--host", "127.0.0.1", "--port", &port.to_string(), "--access-key", S3_KEY, "--secret-key", S3_SECRET])
            .arg(&root)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.0.join("s3s.log")).unwrap())
            .spawn()
            .expect("s3s-fs starts");
        wait_listening(port, Instant::now(), 30, "s3s-fs");
        Self { endpoint: format!("http://127.0.0.1:{port}"), bucket, root, child, _dir: dir }
    }

    /// Every object key in the bucket (from the server's folder).
    pub fn keys(&self) -> Vec<String> {
        fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
            for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                let p = e.path();
                if p.is_dir() {
                    walk(base, &p, out);
                } else {
                    out.push(p.strip_prefix(base).unwrap().display().to_string());
                }
            }
        }
        let mut keys = Vec::new();
        let base = self.root.join(&self.bucket);
        walk(&base, &base, &mut keys);
        keys.sort();
        keys
    }
}

impl Drop for S3 {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Shared settings of a cluster's processes.
#[derive(Clone)]
pub struct ClusterConfig {
    /// `None`: each process's own SQLite file, unless `shared_dir` is set.
    pub database_url: Option<String>,
    /// `None`: the adapters folder.
    pub adapter_store: Option<String>,
    pub s3_endpoint: String,
    /// Data and adapters folders shared by every process (one host, SQLite, polling only).
    pub shared_dir: Option<PathBuf>,
    pub model: PathBuf,
    pub lease_timeout_s: f64,
    pub poll_interval_s: f64,
}

impl ClusterConfig {
    pub fn new(pg: &Postgres, s3: &S3) -> Self {
        Self {
            database_url: Some(pg.url.clone()),
            adapter_store: Some(format!("s3://{}/sdserve", s3.bucket)),
            s3_endpoint: s3.endpoint.clone(),
            shared_dir: None,
            model: fixture_dir(),
            lease_timeout_s: 2.0,
            poll_interval_s: 1.0,
        }
    }
}

/// One `sdserve serve` process.
pub struct Sdserve {
    pub name: String,
    pub url: String,
    pub data: TempDir,
    child: Option<Child>,
    pub client: Client,
}

impl Sdserve {
    /// Starts `sdserve serve --role ROLE` and waits until it is ready.
    pub fn start(name: &str, role: &str, cfg: &ClusterConfig) -> Self {
        let data = TempDir::new(&format!("node-{name}"));
        let log = data.0.join("sdserve.log");
        let folders = cfg.shared_dir.clone().unwrap_or_else(|| data.0.clone());
        let mut command = Command::new(env!("CARGO_BIN_EXE_sdserve"));
        command
            .args(["serve", "--port", "0", "--role", role])
            .arg("--model")
            .arg(&cfg.model)
            .arg("--data-dir")
            .arg(folders.join("data"))
            .arg("--adapters-dir")
            .arg(folders.join("adapters"));
        for (var, value) in [("SDSERVE_DATABASE_URL", &cfg.database_url), ("SDSERVE_ADAPTER_STORE", &cfg.adapter_store)] {
            match value {
                Some(v) => command.env(var, v),
                None => command.env_remove(var),
            };
        }
        let child = command
            .env("SDSERVE_LEASE_TIMEOUT_S", cfg.lease_timeout_s.to_string())
            .env("SDSERVE_POLL_INTERVAL_S", cfg.poll_interval_s.to_string())
            .env("SDSERVE_DEFAULT_STEPS", "2")
            .env("AWS_ACCESS_KEY_ID", S3_KEY)
            .env("AWS_SECRET_ACCESS_KEY", S3_SECRET)
            .env("AWS_ENDPOINT_URL", &cfg.s3_endpoint)
            .env("AWS_ALLOW_HTTP", "true")
            .env("AWS_REGION", "us-east-1")
            .env("RUST_LOG", "info,sqlx=warn")
            .env_remove("SDSERVE_PORT")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("sdserve starts");
        let start = Instant::now();
        let url = loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if let Some(addr) = text.lines().find_map(|l| l.split("listening on ").nth(1)).and_then(|rest| rest.split_whitespace().next()) {
                break addr.to_string();
            }
            if text.contains("error:") {
                panic!("{name} failed to start:\n{text}");
            }
            assert!(start.elapsed() < Duration::from_secs(120), "{name} did not listen within 120 s:\n{text}");
            std::thread::sleep(Duration::from_millis(50));
        };
        let client = Client::builder().timeout(Duration::from_secs(300)).build().unwrap();
        let node = Self { name: name.to_string(), url, data, child: Some(child), client };
        node.wait_ready();
        node
    }

    fn wait_ready(&self) {
        let start = Instant::now();
        loop {
            if self.client.get(format!("{}/ready", self.url)).send().is_ok_and(|r| r.status().is_success()) {
                return;
            }
            assert!(start.elapsed() < Duration::from_secs(120), "{} not ready within 120 s:\n{}", self.name, self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data.0.join("sdserve.log")).unwrap_or_default()
    }

    pub fn get(&self, path: &str) -> reqwest::blocking::Response {
        self.client.get(format!("{}{path}", self.url)).send().unwrap()
    }

    pub fn get_json(&self, path: &str) -> Value {
        self.get(path).json().unwrap()
    }

    pub fn post(&self, path: &str, body: &Value) -> reqwest::blocking::Response {
        self.client.post(format!("{}{path}", self.url)).json(body).send().unwrap()
    }

    pub fn put(&self, path: &str, bytes: Vec<u8>) -> reqwest::blocking::Response {
        self.client.put(format!("{}{path}", self.url)).body(bytes).send().unwrap()
    }

    /// The process id (to measure it).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// `kill -9`.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Sdserve {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Polls `f` every 10 ms until it returns `Some`, failing after `secs` seconds.
pub fn eventually<T>(secs: f64, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed().as_secs_f64() < secs, "{what}: not within {secs} s");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// An /align request that trains quickly on the fixture model (2 DDIM steps, K = 1).
pub fn align_body(name: &str, steps: usize) -> Value {
    common::align_request(name, steps, 2, 1)
}

/// Waits until `port` accepts connections, failing `secs` seconds after `start`.
fn wait_listening(port: u16, start: Instant, secs: u64, what: &str) {
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(start.elapsed() < Duration::from_secs(secs), "{what} did not listen within {secs} s");
        std::thread::sleep(Duration::from_millis(50));
    }
}
