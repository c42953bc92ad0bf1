//! The official `openai` Python package works against the server: tests/openai_client.py runs
//! with `python3` against a live server. It fails (does not skip) when python3 or the package
//! is missing; install it with `python3 -m pip install openai`.

mod server_support;

use std::process::Command;

#[test]
fn official_openai_python_client_works() {
    let s = server_support::start(|c| c.api_key = Some("test-key".into()));
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/openai_client.py");
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let out = Command::new(&python)
        .arg(&script)
        .arg(s.server.url())
        .arg("test-key")
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run {python}: {e} (python3 with `pip install openai` is required)")
        });
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    eprintln!("{stderr}");
    assert!(
        out.status.success(),
        "tests/openai_client.py failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    assert!(stdout.contains("all checks passed"));
}
