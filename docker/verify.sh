#!/usr/bin/env bash
# Verifies docker/Dockerfile on a machine WITHOUT a Docker engine or a reachable image
# registry, using buildah and podman (chroot isolation, vfs storage):
#
#   1. checks that buildah, podman, debootstrap and curl are installed (it installs nothing:
#      it prints the apt-get command instead);
#   2. builds sdserve into the work folder (CARGO_TARGET_DIR=$WORKDIR/target cargo build
#      --release --locked --bin sdserve) and copies the build context there;
#   3. makes a Debian bookworm base image locally: debootstrap --variant=minbase into a folder,
#      tar, `podman import` as localhost/bookworm-slim-local (kept and reused by later runs);
#   4. builds the image's `runtime-prebuilt` stage with that base and the host binary
#      (buildah bud --isolation chroot --build-arg BASE_IMAGE=localhost/bookworm-slim-local);
#   5. starts `sdserve serve` in a container (buildah run --isolation chroot shares the host's
#      network) on a free port, with the image's own entrypoint, user and environment;
#   6. checks /health (from the host, and with the image's HEALTHCHECK command inside a second
#      container), waits for /ready, and runs one image generation;
#   7. removes the containers and the image (the base image stays cached).
#
# Must run as root (debootstrap, chroot). Not run by CI. Re-running is safe.
#
# It writes nothing outside its work folder: every file it makes (build output, image store,
# base image, container runtime state, logs, volumes) is under VERIFY_WORKDIR, every removal is
# checked to resolve inside it, and the tools' own state (HOME, XDG folders) is pointed there.
# (An earlier version installed packages on the host and trimmed documentation with `find
# -delete` on paths it did not check; that once damaged /usr/share/doc of the machine it ran on.)
#
# Options:
#   --rebuild-base   debootstrap a fresh base image even if one is cached
#   --keep-image     leave localhost/sdserve:verify in the store afterwards
#   --purge          remove everything this script made (storage, base image, work folder), exit
#   --skip-build     do not run cargo; use target/release/sdserve as it is
#   --fixture        serve tests/fixtures/tiny-sd1 even if the image has a default model
#   --base-only      only make (or check) the base image, then stop
# Environment:
#   VERIFY_WORKDIR   scratch folder (default /var/tmp/sdserve-verify)
#   DEBIAN_MIRROR    mirror for debootstrap (default: the one apt on this machine uses)
#   VERIFY_PORT      host port for the server (default: a free one)

set -Eeuo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORKDIR="${VERIFY_WORKDIR:-/var/tmp/sdserve-verify}"
BASE_IMAGE="localhost/bookworm-slim-local"
IMAGE="localhost/sdserve:verify"
FIXTURE="$REPO_ROOT/tests/fixtures/tiny-sd1"
SUITE="bookworm"

REBUILD_BASE=0 KEEP_IMAGE=0 PURGE=0 SKIP_BUILD=0 FORCE_FIXTURE=0 BASE_ONLY=0
for arg in "$@"; do
  case "$arg" in
    --rebuild-base) REBUILD_BASE=1 ;;
    --keep-image) KEEP_IMAGE=1 ;;
    --purge) PURGE=1 ;;
    --skip-build) SKIP_BUILD=1 ;;
    --fixture) FORCE_FIXTURE=1 ;;
    --base-only) BASE_ONLY=1 ;;
    -h|--help) sed -n '2,/^set -E/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown option: $arg (try --help)" >&2; exit 2 ;;
  esac
done

case "$WORKDIR" in
  /*/*) ;;
  *) echo "VERIFY_WORKDIR must be an absolute path at least two levels deep: $WORKDIR" >&2; exit 2 ;;
esac
mkdir -p "$WORKDIR"
WORKDIR="$(realpath -e -- "$WORKDIR")"
case "$WORKDIR" in
  /|/bin|/boot|/dev|/etc|/home|/lib*|/opt|/proc|/root|/run|/sbin|/srv|/sys|/tmp|/usr|/usr/*|/var|/var/lib|/var/tmp)
    echo "VERIFY_WORKDIR must be a folder of its own, not $WORKDIR" >&2; exit 2 ;;
esac
# A folder this script did not make must be empty before it takes it over.
MARKER="$WORKDIR/.sdserve-verify"
if [ ! -e "$MARKER" ]; then
  [ -z "$(ls -A "$WORKDIR")" ] || { echo "$WORKDIR is not empty and not a verify.sh work folder" >&2; exit 2; }
  : >"$MARKER"
fi
STORAGE_ROOT="$WORKDIR/storage"
RUN_ROOT="$WORKDIR/run"

# Removes paths only if they resolve inside the work folder (symbolic links included).
inside_workdir() { case "$(realpath -m -- "$1")" in "$WORKDIR"/*) return 0 ;; *) return 1 ;; esac; }
safe_rm() {
  local p
  for p in "$@"; do
    [ -e "$p" ] || [ -L "$p" ] || continue
    inside_workdir "$p" || { echo "refusing to remove $p: outside $WORKDIR" >&2; exit 3; }
    rm -rf --one-file-system -- "$p"
  done
}

# The container tools keep their state (configuration, caches, runtime files) in the work folder.
export HOME="$WORKDIR/home" XDG_RUNTIME_DIR="$WORKDIR/xdg-run" XDG_CONFIG_HOME="$WORKDIR/home/.config" \
  XDG_DATA_HOME="$WORKDIR/home/.local/share" XDG_CACHE_HOME="$WORKDIR/home/.cache" TMPDIR="$WORKDIR/tmp"
mkdir -p "$HOME" "$XDG_RUNTIME_DIR" "$TMPDIR"
chmod 700 "$XDG_RUNTIME_DIR"

STEP=0
step() { STEP=$((STEP + 1)); printf '\n==> [%d] %s\n' "$STEP" "$*"; }
info() { printf '    %s\n' "$*"; }
fail() { printf '\n!!! FAILED: %s\n' "$*" >&2; exit 1; }

# Both tools on one private store, vfs driver (no overlay needed), no systemd/journald.
STORE_OPTS=(--root "$STORAGE_ROOT" --runroot "$RUN_ROOT" --storage-driver vfs)
bh() { buildah "${STORE_OPTS[@]}" "$@"; }
pm() { podman "${STORE_OPTS[@]}" --cgroup-manager cgroupfs --events-backend file "$@"; }

[ "$(id -u)" -eq 0 ] || fail "run as root (debootstrap and chroot isolation need it)"

if [ "$PURGE" -eq 1 ]; then
  step "Purging $WORKDIR (private image store, base image, logs)"
  if command -v buildah >/dev/null && [ -d "$STORAGE_ROOT" ]; then
    bh rm --all >/dev/null 2>&1 || true
    bh rmi --all --force >/dev/null 2>&1 || true
  fi
  [ -e "$MARKER" ] || fail "$WORKDIR has no $MARKER: not removing it"
  find "$WORKDIR" -mindepth 1 -maxdepth 1 -exec sh -c 'for p; do case "$(realpath -m -- "$p")" in "$0"/*) rm -rf --one-file-system -- "$p" ;; esac; done' "$WORKDIR" {} +
  rmdir "$WORKDIR" 2>/dev/null || true
  info "done"
  exit 0
fi

# --------------------------------------------------------------------------------------------
# Cleanup: the server process tree we started, the working containers, the image.
SERVER_PID="" CTR="" HC_CTR="" ROOTFS_TMP=""
descendants() {
  local p
  for p in $(ps -o pid= --ppid "$1" 2>/dev/null); do
    descendants "$p"
    echo "$p"
  done
}
stop_tree() { # leaf processes first, TERM, then KILL whatever is left
  local root="$1" pids p
  pids="$(descendants "$root") $root"
  for p in $pids; do kill -TERM "$p" 2>/dev/null || true; done
  for _ in $(seq 1 50); do
    local alive=0
    for p in $pids; do kill -0 "$p" 2>/dev/null && alive=1; done
    [ "$alive" -eq 0 ] && return 0
    sleep 0.2
  done
  for p in $pids; do kill -KILL "$p" 2>/dev/null || true; done
}
cleanup() {
  local rc=$?
  set +e
  trap - EXIT INT TERM
  printf '\n==> Cleanup\n'
  if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
    # SIGTERM to sdserve itself (as `docker stop` would), then wait for buildah run to end.
    local p srv=""
    for p in $(descendants "$SERVER_PID"); do
      [ "$(readlink "/proc/$p/exe" 2>/dev/null | xargs -r basename)" = sdserve ] && srv="$p"
    done
    [ -n "$srv" ] && kill -TERM "$srv" 2>/dev/null
    for _ in $(seq 1 75); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.2; done
    if kill -0 "$SERVER_PID" 2>/dev/null; then
      stop_tree "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null
      info "server did not stop within 15 s of SIGTERM; killed"
    else
      wait "$SERVER_PID" 2>/dev/null
      info "server stopped on SIGTERM (buildah run exit $?); its last log line: $(tail -n 1 "$SERVER_LOG")"
    fi
  fi
  [ -n "$HC_CTR" ] && bh rm "$HC_CTR" >/dev/null 2>&1
  [ -n "$CTR" ] && bh rm "$CTR" >/dev/null 2>&1 && info "container removed"
  if [ "$KEEP_IMAGE" -eq 0 ] && bh images -q "$IMAGE" >/dev/null 2>&1; then
    bh rmi -f "$IMAGE" >/dev/null 2>&1 && info "image $IMAGE removed (--keep-image keeps it)"
    bh rmi --prune >/dev/null 2>&1   # dangling intermediate stages (assets)
  fi
  [ -n "$ROOTFS_TMP" ] && safe_rm "$ROOTFS_TMP"
  safe_rm "$WORKDIR/mounts" "$WORKDIR/context"
  info "base image $BASE_IMAGE kept in $STORAGE_ROOT (--purge removes it)"
  if [ "$rc" -eq 0 ]; then printf '\n==> RESULT: OK\n'; else printf '\n==> RESULT: FAILED (exit %d)\n' "$rc"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

mkdir -p "$WORKDIR" "$STORAGE_ROOT" "$RUN_ROOT"

# --------------------------------------------------------------------------------------------
step "Tools"
need=()
command -v buildah >/dev/null || need+=(buildah)
command -v podman >/dev/null || need+=(podman)
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v curl >/dev/null || need+=(curl)
command -v python3 >/dev/null || need+=(python3)
[ -e /usr/share/keyrings/debian-archive-keyring.gpg ] || need+=(debian-archive-keyring)
if [ "${#need[@]}" -gt 0 ]; then
  fail "missing: ${need[*]}; install them first (this script changes nothing outside $WORKDIR):
    apt-get install --no-install-recommends ${need[*]}"
fi
info "$(buildah --version)"
info "$(podman --version)"
info "debootstrap $(dpkg-query -W -f='${Version}' debootstrap 2>/dev/null || echo '?')"

# --------------------------------------------------------------------------------------------
BIN="$WORKDIR/target/release/sdserve"
if [ "$BASE_ONLY" -eq 1 ]; then
  :
elif [ "$SKIP_BUILD" -eq 1 ]; then
  step "Host binary (--skip-build: using $BIN as it is)"
else
  step "Host binary: cargo build --release --locked --bin sdserve (into $WORKDIR/target)"
  (cd "$REPO_ROOT" && CARGO_TARGET_DIR="$WORKDIR/target" CARGO_HOME="${CARGO_HOME:-/root/.cargo}" \
    nice -n 10 cargo build --release --locked --bin sdserve) || fail "cargo build failed"
fi
if [ "$BASE_ONLY" -eq 0 ]; then
  [ -x "$BIN" ] || fail "$BIN is missing"
  "$BIN" serve --help >/dev/null 2>&1 || fail "$BIN has no 'serve' subcommand yet"
  info "$("$BIN" --version), $(du -h "$BIN" | cut -f1), built $(date -r "$BIN" '+%F %T')"
  info "needs: $(ldd "$BIN" | awk '/=>/ {print $1}' | tr '\n' ' ')"
fi

# --------------------------------------------------------------------------------------------
# The Debian mirror apt on this machine uses (only those package hosts may be reachable).
apt_uri() { # $1: suite to look for
  python3 - "$1" <<'PY'
import glob, re, sys
suite = sys.argv[1]
for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
    for stanza in re.split(r"\n\s*\n", open(path).read()):
        fields = {}
        for line in stanza.splitlines():
            if line.startswith("#") or ":" not in line or line[0].isspace():
                continue
            k, v = line.split(":", 1)
            fields[k.strip().lower()] = v.split()
        if "deb" in fields.get("types", []) and suite in fields.get("suites", []):
            print(fields["uris"][0]); sys.exit(0)
for path in ["/etc/apt/sources.list"] + sorted(glob.glob("/etc/apt/sources.list.d/*.list")):
    try:
        lines = open(path).read().splitlines()
    except OSError:
        continue
    for line in lines:
        parts = re.sub(r"\[[^]]*\]", "", line).split()
        if len(parts) >= 3 and parts[0] == "deb" and parts[2] == suite:
            print(parts[1]); sys.exit(0)
PY
}

if [ "$REBUILD_BASE" -eq 0 ] && pm image exists "$BASE_IMAGE" 2>/dev/null; then
  step "Base image $BASE_IMAGE (cached; --rebuild-base makes a new one)"
else
  step "Base image $BASE_IMAGE: debootstrap --variant=minbase $SUITE, podman import"
  MIRROR="${DEBIAN_MIRROR:-$(apt_uri "$SUITE")}"
  MIRROR="${MIRROR:-http://deb.debian.org/debian}"
  SECURITY="$(apt_uri "$SUITE-security")"
  SECURITY="${SECURITY:-http://deb.debian.org/debian-security}"
  info "mirror: $MIRROR   security: $SECURITY"
  ROOTFS_TMP="$WORKDIR/rootfs"
  safe_rm "$ROOTFS_TMP"
  debootstrap --variant=minbase --arch="$(dpkg --print-architecture)" \
    --keyring=/usr/share/keyrings/debian-archive-keyring.gpg \
    "$SUITE" "$ROOTFS_TMP" "$MIRROR" >"$WORKDIR/debootstrap.log" 2>&1 \
    || { tail -n 20 "$WORKDIR/debootstrap.log"; fail "debootstrap failed (log: $WORKDIR/debootstrap.log)"; }
  # Look like debian:bookworm-slim: deb822 sources with updates and security, no caches.
  safe_rm "$ROOTFS_TMP/etc/apt/sources.list"
  cat >"$ROOTFS_TMP/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $MIRROR
Suites: $SUITE $SUITE-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $SECURITY
Suites: $SUITE-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  # The apt and dpkg settings of the official debian:*-slim images: no package caches, no
  # translations, compressed indexes, no docs, man pages or locales from later installs.
  mkdir -p "$ROOTFS_TMP/etc/apt/apt.conf.d" "$ROOTFS_TMP/etc/dpkg/dpkg.cfg.d"
  printf '%s\n' \
    'DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };' \
    'APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };' \
    'Dir::Cache::pkgcache "";' 'Dir::Cache::srcpkgcache "";' \
    >"$ROOTFS_TMP/etc/apt/apt.conf.d/docker-clean"
  echo 'Acquire::Languages "none";' >"$ROOTFS_TMP/etc/apt/apt.conf.d/docker-no-languages"
  echo 'Acquire::GzipIndexes "true";' >"$ROOTFS_TMP/etc/apt/apt.conf.d/docker-gzip-indexes"
  echo 'Apt::AutoRemove::SuggestsImportant "false";' >"$ROOTFS_TMP/etc/apt/apt.conf.d/docker-autoremove-suggests"
  printf '%s\n' 'path-exclude /usr/share/doc/*' 'path-include /usr/share/doc/*/copyright' \
    'path-exclude /usr/share/groff/*' 'path-exclude /usr/share/info/*' \
    'path-exclude /usr/share/linda/*' 'path-exclude /usr/share/lintian/overrides/*' \
    'path-exclude /usr/share/locale/*' 'path-exclude /usr/share/man/*' \
    >"$ROOTFS_TMP/etc/dpkg/dpkg.cfg.d/docker"
  # Only ever inside the fresh debootstrap folder: the doc folder must resolve there (a
  # symbolic link out of it is refused), and find neither follows links nor leaves the device.
  DOC="$(realpath -e -- "$ROOTFS_TMP/usr/share/doc")"
  case "$DOC" in "$WORKDIR"/rootfs/usr/share/doc) ;; *) fail "refusing to trim $DOC" ;; esac
  find -P "$DOC" -xdev -mindepth 1 ! -name copyright ! -type d -delete
  find -P "$DOC" -xdev -mindepth 1 -type d -empty -delete
  safe_rm "$ROOTFS_TMP"/var/lib/apt/lists/* "$ROOTFS_TMP"/var/cache/apt/*.bin \
         "$ROOTFS_TMP"/var/cache/apt/archives/*.deb "$ROOTFS_TMP"/var/log/*.log \
         "$ROOTFS_TMP"/usr/share/man/* "$ROOTFS_TMP"/usr/share/info/* \
         "$ROOTFS_TMP"/usr/share/locale/* "$ROOTFS_TMP"/usr/share/groff/*
  : >"$ROOTFS_TMP/etc/resolv.conf"
  echo localhost >"$ROOTFS_TMP/etc/hostname"
  tar --numeric-owner --xattrs -C "$ROOTFS_TMP" -cf "$WORKDIR/rootfs.tar" .
  pm image rm -f "$BASE_IMAGE" >/dev/null 2>&1 || true
  pm import -q --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' --change 'CMD ["bash"]' --message "debootstrap $SUITE minbase" \
    "$WORKDIR/rootfs.tar" "$BASE_IMAGE" >/dev/null
  safe_rm "$ROOTFS_TMP" "$WORKDIR/rootfs.tar"; ROOTFS_TMP=""
fi
info "$(bh images --format '{{.Name}}:{{.Tag}}  {{.ID}}  {{.Size}}' "$BASE_IMAGE")"
[ "$BASE_ONLY" -eq 0 ] || exit 0

# --------------------------------------------------------------------------------------------
step "Building $IMAGE: docker/Dockerfile --target runtime-prebuilt (buildah bud, chroot isolation)"
BUILD_LOG="$WORKDIR/build.log"
# The build context is a copy in the work folder (what .dockerignore lets in), with the binary.
CONTEXT="$WORKDIR/context"
safe_rm "$CONTEXT"
mkdir -p "$CONTEXT/target/release"
(cd "$REPO_ROOT" && cp -r Cargo.toml Cargo.lock src benches models adapters docker migrations .dockerignore "$CONTEXT/")
cp "$BIN" "$CONTEXT/target/release/sdserve"
if ! (cd "$CONTEXT" && bh bud --isolation chroot --format docker --pull=never --layers=false \
      --build-arg BASE_IMAGE="$BASE_IMAGE" --target runtime-prebuilt \
      -f docker/Dockerfile -t "$IMAGE" . ) >"$BUILD_LOG" 2>&1; then
  tail -n 30 "$BUILD_LOG"
  fail "image build failed (log: $BUILD_LOG)"
fi
grep -E '^(STEP|\[[0-9]+/[0-9]+\] STEP) ' "$BUILD_LOG" | sed 's/^/    /' || true
IMAGE_SIZE="$(bh images --format '{{.Size}}' "$IMAGE")"
info "image size: $IMAGE_SIZE (base $(bh images --format '{{.Size}}' "$BASE_IMAGE"))"
bh inspect --type image "$IMAGE" >"$WORKDIR/image-inspect.json"
python3 - "$WORKDIR/image-inspect.json" <<'PY'
import json, sys
c = json.load(open(sys.argv[1]))["Docker"]["config"]
hc = c.get("Healthcheck") or {}
print("    user:        ", c.get("User"))
print("    workdir:     ", c.get("WorkingDir"))
print("    entrypoint:  ", c.get("Entrypoint"), " cmd:", c.get("Cmd"))
print("    ports:       ", sorted((c.get("ExposedPorts") or {}).keys()))
print("    volumes:     ", sorted((c.get("Volumes") or {}).keys()))
print("    healthcheck: ", hc.get("Test"), "every %ss" % (hc.get("Interval", 0) // 10**9))
print("    env:         ", " ".join(e for e in c.get("Env", []) if e.startswith(("SDSERVE_", "RUST_LOG"))))
PY
cfg_args() { # NUL-separated strings of the image config's $1 (Entrypoint, or Healthcheck.Test)
  python3 - "$WORKDIR/image-inspect.json" "$1" <<'PY'
import json, sys
v = json.load(open(sys.argv[1]))["Docker"]["config"]
for key in sys.argv[2].split("."):
    v = (v or {}).get(key)
sys.stdout.write("".join(a + "\0" for a in (v or [])))
PY
}
mapfile -d '' ENTRYPOINT < <(cfg_args Entrypoint)
mapfile -d '' HEALTH_TEST < <(cfg_args Healthcheck.Test)
[ "${#ENTRYPOINT[@]}" -gt 0 ] || fail "the image has no ENTRYPOINT"

# --------------------------------------------------------------------------------------------
step "Starting the server in a container"
CTR="$(bh from --pull=never --name sdserve-verify-$$ "$IMAGE")"
info "container: $CTR"
# buildah 1.28 mounts an image VOLUME and a `-v` bind on the same path (or below it) in random
# order, so the bind is sometimes hidden; Docker always lets -v win. Drop the VOLUME entries
# from this working container (the image keeps them) so the -v mounts below are deterministic.
mapfile -t IMAGE_VOLUMES < <(python3 -c 'import json,sys; print("\n".join(sorted((json.load(open(sys.argv[1]))["Docker"]["config"].get("Volumes") or {}).keys())))' "$WORKDIR/image-inspect.json")
for v in "${IMAGE_VOLUMES[@]}"; do [ -n "$v" ] && bh config --volume "$v-" "$CTR"; done
info "inside: $(bh run --isolation chroot "$CTR" -- sh -c 'echo "uid=$(id -u)($(id -un)) cwd=$(pwd) binary: $(sdserve --version)"')"
CTR_UID="$(bh run --isolation chroot "$CTR" -- id -u)"
[ "$CTR_UID" != 0 ] || fail "the image runs as root"

PORT="${VERIFY_PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
MOUNTS=("$WORKDIR/mounts/adapters" "$WORKDIR/mounts/data")
safe_rm "$WORKDIR/mounts"; mkdir -p "${MOUNTS[@]}"
RUN_OPTS=(--isolation chroot -e "SDSERVE_PORT=$PORT" -e NO_COLOR=1
          -v "$WORKDIR/mounts/adapters:/app/adapters" -v "$WORKDIR/mounts/data:/app/data")
if [ "$FORCE_FIXTURE" -eq 0 ] && bh run --isolation chroot "$CTR" -- test -f /app/models/default/model_index.json 2>/dev/null; then
  MODEL_DESC="the image's default model (/app/models/default)"
  # The image's adapters, as a fresh named volume would start with them.
  # One plain file at a time, by a checked name (no archive that could carry links out).
  for f in $(bh run --isolation chroot "$CTR" -- sh -c 'cd /app/adapters && for f in *; do [ -f "$f" ] && [ ! -L "$f" ] && echo "$f"; done'); do
    case "$f" in *[!A-Za-z0-9._-]*|.*) continue ;; esac
    bh run --isolation chroot "$CTR" -- cat "/app/adapters/$f" >"$WORKDIR/mounts/adapters/$f"
  done
else
  MODEL_DESC="tests/fixtures/tiny-sd1 mounted read-only at /models/tiny-sd1 (custom-weights volume)"
  [ -f "$FIXTURE/model_index.json" ] || fail "no default model in the image and no fixture at $FIXTURE"
  RUN_OPTS+=(-v "$FIXTURE:/models/tiny-sd1:ro" -e SDSERVE_MODEL=/models/tiny-sd1)
  [ -d "$FIXTURE/loras" ] && cp "$FIXTURE"/loras/*.safetensors "$WORKDIR/mounts/adapters/" 2>/dev/null || true
fi
chown -R -P "$CTR_UID:$CTR_UID" "${MOUNTS[@]}"
info "model: $MODEL_DESC"
info "volumes: $WORKDIR/mounts/adapters -> /app/adapters ($(find "$WORKDIR/mounts/adapters" -type f | wc -l) file(s)), $WORKDIR/mounts/data -> /app/data"
info "command: ${ENTRYPOINT[*]} (image entrypoint), SDSERVE_PORT=$PORT, host network"
SERVER_LOG="$WORKDIR/server.log"
bh run "${RUN_OPTS[@]}" "$CTR" -- "${ENTRYPOINT[@]}" >"$SERVER_LOG" 2>&1 &
SERVER_PID=$!
BASE_URL="http://127.0.0.1:$PORT"

server_alive() { kill -0 "$SERVER_PID" 2>/dev/null; }
show_log() { echo "    --- server log (last 20 lines) ---"; tail -n 20 "$SERVER_LOG" | sed 's/^/    /'; }

# --------------------------------------------------------------------------------------------
step "GET /health"
deadline=$((SECONDS + 120)); HEALTH=""
until HEALTH="$(curl -fsS --max-time 2 "$BASE_URL/health" 2>/dev/null)"; do
  server_alive || { show_log; fail "the server exited before answering /health"; }
  [ "$SECONDS" -lt "$deadline" ] || { show_log; fail "no answer on $BASE_URL/health within 120 s"; }
  sleep 0.5
done
info "health: $HEALTH"
# The server process as the host sees it: its user must be the image's non-root user.
for p in $(descendants "$SERVER_PID"); do
  if [ "$(readlink "/proc/$p/exe" 2>/dev/null | xargs -r basename)" = sdserve ]; then
    info "server process: pid $p, uid $(awk '/^Uid:/ {print $2}' "/proc/$p/status")"
  fi
done

if [ "${#HEALTH_TEST[@]}" -ge 2 ]; then
  HC_CTR="$(bh from --pull=never --name sdserve-verify-hc-$$ "$IMAGE")"
  case "${HEALTH_TEST[0]}" in
    CMD-SHELL) hc_cmd=(sh -c "${HEALTH_TEST[1]}") ;;
    CMD) hc_cmd=("${HEALTH_TEST[@]:1}") ;;
    *) hc_cmd=() ;;
  esac
  if [ "${#hc_cmd[@]}" -gt 0 ]; then
    if HC_OUT="$(timeout 30 buildah "${STORE_OPTS[@]}" run --isolation chroot -e "SDSERVE_PORT=$PORT" "$HC_CTR" -- "${hc_cmd[@]}" 2>&1)"; then
      info "HEALTHCHECK [${HEALTH_TEST[0]}] ${hc_cmd[*]}"
      info "  run in a second container: exit 0, output: $HC_OUT"
    else
      fail "the image's HEALTHCHECK command failed: $HC_OUT"
    fi
  fi
fi

# --------------------------------------------------------------------------------------------
step "GET /ready (model loaded)"
deadline=$((SECONDS + 600)); code=""
while :; do
  code="$(curl -sS -o "$WORKDIR/ready.json" -w '%{http_code}' --max-time 5 "$BASE_URL/ready" 2>/dev/null || true)"
  [ "$code" = 200 ] && break
  server_alive || { show_log; fail "the server exited while loading the model"; }
  if grep -q '"failed"' "$WORKDIR/ready.json" 2>/dev/null; then
    show_log; fail "model loading failed: $(cat "$WORKDIR/ready.json")"
  fi
  [ "$SECONDS" -lt "$deadline" ] || { show_log; fail "/ready not 200 within 600 s (last: $code)"; }
  sleep 1
done
info "ready: $(cat "$WORKDIR/ready.json")"
info "models: $(curl -fsS "$BASE_URL/v1/models")"
ADAPTERS_JSON="$(curl -fsS "$BASE_URL/v1/adapters" || echo '{}')"
ADAPTER_NAMES="$(python3 -c 'import json,sys
d = json.loads(sys.argv[1] or "{}")
items = d.get("data", d if isinstance(d, list) else [])
print(" ".join(sorted(str(a.get("name", a.get("id"))) for a in items if isinstance(a, dict))))' "$ADAPTERS_JSON" 2>/dev/null || true)"
info "adapters: ${ADAPTER_NAMES:-(none)}"

# --------------------------------------------------------------------------------------------
generate() { # $1: label, $2: JSON body
  local out="$WORKDIR/generation-$1.json" code t0 t1
  t0=$(date +%s.%N)
  code="$(curl -sS -o "$out" -w '%{http_code}' --max-time 900 -H 'Content-Type: application/json' \
          -d "$2" "$BASE_URL/v1/images/generations")" || { show_log; fail "request failed"; }
  t1=$(date +%s.%N)
  info "request:  POST /v1/images/generations $2"
  info "response: HTTP $code in $(python3 -c "print(f'{$t1 - $t0:.2f}')") s"
  [ "$code" = 200 ] || { info "body: $(head -c 600 "$out")"; show_log; fail "generation answered HTTP $code"; }
  python3 - "$out" "$WORKDIR/generation-$1.png" <<'PY'
import base64, hashlib, json, struct, sys
r = json.load(open(sys.argv[1]))
data = r["data"]
img = base64.b64decode(data[0]["b64_json"])
kind = "PNG" if img[:8] == b"\x89PNG\r\n\x1a\n" else "JPEG" if img[:2] == b"\xff\xd8" else "RIFF/WebP" if img[:4] == b"RIFF" else "unknown"
dims = "%dx%d" % struct.unpack(">II", img[16:24]) if kind == "PNG" else "?"
open(sys.argv[2], "wb").write(img)
p = r.get("parameters", {})
print(f"    images:   {len(data)}; first: {kind} {dims}, {len(img)} bytes "
      f"(b64_json {len(data[0]['b64_json'])} chars), sha256 {hashlib.sha256(img).hexdigest()[:16]}…, seed {data[0].get('seed')}")
print(f"    params:   model={p.get('model')} size={p.get('size')} steps={p.get('steps')} "
      f"scheduler={p.get('scheduler')} guidance={p.get('guidance_scale')} loras={p.get('loras')}")
print(f"    saved:    {sys.argv[2]}")
PY
}

step "POST /v1/images/generations"
generate plain '{"prompt": "a red square on a blue background", "size": "64x64", "steps": 4, "seed": 1}'
FIRST_LORA="${ADAPTER_NAMES%% *}"
if [ -n "$FIRST_LORA" ]; then
  step "POST /v1/images/generations with adapter $FIRST_LORA (from the adapters volume)"
  generate lora "{\"prompt\": \"a red square on a blue background\", \"size\": \"64x64\", \"steps\": 4, \"seed\": 1, \"loras\": [{\"name\": \"$FIRST_LORA\", \"weight\": 0.8}]}"
fi
DATA_FILES="$(cd "$WORKDIR/mounts/data" && find . -mindepth 1 | head -n 5 | tr '\n' ' ')"
info "data volume (/app/data) holds: ${DATA_FILES:-(nothing yet)}"

step "Summary"
info "image:       $IMAGE ($IMAGE_SIZE), base $BASE_IMAGE"
info "health:      $HEALTH"
info "generation:  OK (see above); server log: $SERVER_LOG"
