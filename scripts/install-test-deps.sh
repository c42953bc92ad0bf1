#!/usr/bin/env bash
# Installs the real servers the tests start (nothing is mocked): PostgreSQL from the
# distribution's packages and the S3-compatible s3s-fs from crates.io. Fast when both are there.
set -euo pipefail
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  echo "installing PostgreSQL (apt-get install postgresql)"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends postgresql >/dev/null
fi
if ! command -v s3s-fs >/dev/null 2>&1 && [ ! -x "${CARGO_HOME:-$HOME/.cargo}/bin/s3s-fs" ]; then
  echo "installing s3s-fs (cargo install s3s-fs)"
  # 0.14.1: the newest release that builds with the Rust this project is built with (1.95; 0.15+ need 1.96).
  cargo install --locked s3s-fs@0.14.1 --features binary
fi
