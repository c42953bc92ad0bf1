#!/usr/bin/env bash
# Compiles sdserve with `--features cuda` on a machine without a GPU or a CUDA toolkit, so that
# the CUDA image cannot silently stop building:
#
#   1. makes a Python virtual environment in the work folder and installs nvcc and the CUDA
#      headers from the Python package registry (nvidia-cuda-nvcc, nvidia-cuda-runtime,
#      nvidia-cuda-nvrtc, nvidia-cuda-cccl, nvidia-cublas, nvidia-curand: CUDA 13, whose wheels share one
#      toolkit-shaped folder `nvidia/cu13`; the CUDA 12 nvcc wheels hold only ptxas). nvvm and
#      crt are pinned to nvcc's version: newer ones emit PTX its ptxas cannot assemble;
#   2. uses that folder as CUDA_HOME;
#   3. runs `cargo build --release --locked --features cuda --lib` with an explicit compute
#      capability (CUDA_COMPUTE_CAP, default 80), so every CUDA kernel is compiled by nvcc.
#
# The library is built, not the `sdserve` binary: linking the binary needs the NVIDIA driver's
# libcuda.so, which only a machine with a driver has (the CUDA image's builder stage gets it
# from the toolkit's stubs). Everything else the binary contains is compiled here.
#
# Usage: scripts/check-cuda-build.sh [WORKDIR]   (default: target/cuda-check; reused by reruns)
# Environment: CUDA_COMPUTE_CAP (default 80; CUDA 13 needs at least 75), CUDA_PYPI_VERSION
# (default 13.0.*).

set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORK="${1:-$REPO/target/cuda-check}"
CAP="${CUDA_COMPUTE_CAP:-80}"
VERSION="${CUDA_PYPI_VERSION:-13.0.*}"
mkdir -p "$WORK"
WORK="$(cd "$WORK" && pwd)"

echo "==> CUDA toolkit from PyPI into $WORK/venv (nvcc $VERSION)"
if [ ! -x "$WORK/venv/bin/python" ]; then
  python3 -m venv "$WORK/venv"
fi
"$WORK/venv/bin/pip" install -q --disable-pip-version-check \
  "nvidia-cuda-nvcc==$VERSION" "nvidia-cuda-runtime==$VERSION" "nvidia-cuda-nvrtc==$VERSION" \
  "nvidia-cuda-cccl==$VERSION" "nvidia-nvvm==$VERSION" "nvidia-cuda-crt==$VERSION" \
  "nvidia-cublas" "nvidia-curand"
HOME_DIR="$("$WORK/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/nvidia/cu13"
[ -x "$HOME_DIR/bin/nvcc" ] || { echo "no nvcc in $HOME_DIR/bin" >&2; exit 1; }
# Library folder as a toolkit has it (lib64), for build scripts that look there.
[ -e "$HOME_DIR/lib64" ] || ln -s lib "$HOME_DIR/lib64"
export CUDA_HOME="$HOME_DIR" CUDA_PATH="$HOME_DIR" CUDA_ROOT="$HOME_DIR"
export PATH="$HOME_DIR/bin:$PATH"
export CUDA_COMPUTE_CAP="$CAP"
nvcc --version | tail -n 2

echo "==> cargo build --release --locked --features cuda --lib (compute capability $CAP)"
start=$(date +%s)
cd "$REPO"
CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$WORK/target}" cargo build --release --locked --features cuda --lib
echo "==> OK: the cuda feature compiles (sm_$CAP) in $(( $(date +%s) - start )) s"
