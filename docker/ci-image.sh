#!/usr/bin/env bash
# CI: build the image's cpu variant and run it the way deployments do, then remove everything
# this script made. `.ci/run` calls it after the tests; it runs on its own too (as root):
#
#   docker/ci-image.sh
#
# What it verifies (and docs/deployment.md, "What CI verifies"):
#   1. docker/Dockerfile builds (VARIANT=cpu, `--format docker` so that SHELL and HEALTHCHECK are
#      kept) on a Debian bookworm base with Python 3.11 made here with debootstrap;
#   2. the image runs hardened, as compose and Kubernetes run it: uid 10001, read-only root
#      filesystem, a tmpfs at /tmp, every capability dropped, no new privileges, and no network
#      at all (it must not download anything at start-up);
#   3. /readyz turns 200 (model loaded and warmed), the image's own HEALTHCHECK passes, a real
#      photo comes back ×4 over HTTP, and /metrics counts it.
# It cannot verify the cuda variant (no NVIDIA base image or GPU here).
#
# Outcome: exit 0 and "ci-image: passed" with the wall time of each phase; exit 0 and one line
# "ci-image: skipped: REASON" when this machine cannot run containers at all (not root, podman not
# installable, namespaces refused, no room on disk) or cannot download what the image is made of
# (the Debian mirror, or PyPI twice in a row); exit 1 and "ci-image: FAILED: ..." with the
# container's log on a defect of the project. VPDSR_CI_IMAGE=skip skips it on purpose.
#
# What this machine needs, kept here rather than in the Dockerfile (none of it is the image's
# business): podman, runc and debootstrap from Debian (installed when missing); runc rather than
# crun (crun fails on cgroup v1/hybrid hosts); container ulimits within the host's hard limits
# (podman's defaults of nofile 1048576 exceed them on some VMs); the host's CA certificates in the
# base, for pip (package downloads may pass a TLS-inspecting proxy); PyTorch's CPU index when it
# is reachable, PyPI's otherwise (its torch carries CUDA libraries: a larger image, the same CPU
# code). Everything lives in one private podman store under a temporary folder, removed at the
# end, so the machine's own containers and images are never touched and no cache survives (each
# run downloads the packages again).
set -euo pipefail
cd "$(dirname "$0")/.."

say() { echo "ci-image: $*"; }
skip() { say "skipped: $*"; exit 0; }
die() { say "FAILED: $*" >&2; exit 1; }

MIRROR=${VPDSR_CI_DEBIAN_MIRROR:-http://deb.debian.org/debian}
READY_S=${VPDSR_CI_READY_S:-900}   # model load + warm-up in the container, on a loaded 2-core CPU
NEED_GB=25                         # base + builder (PyPI's torch: ~5 GB venv) + image + pip's downloads
NETWORK_ERRORS='ConnectionError|ConnectTimeout|Read timed out|Temporary failure in name resolution|Network is unreachable|ProxyError|HTTPSConnectionPool|Connection reset'

[ "${VPDSR_CI_IMAGE:-}" = skip ] && skip "VPDSR_CI_IMAGE=skip"
[ "$(id -u)" = 0 ] || skip "not root: debootstrap and rootful podman need root"

# -- tools -------------------------------------------------------------------------------------
missing=()
for tool in podman runc debootstrap; do command -v "$tool" >/dev/null || missing+=("$tool"); done
if ((${#missing[@]})); then
  command -v apt-get >/dev/null || skip "no ${missing[*]} and no apt-get to install them"
  say "installing ${missing[*]}"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      "${missing[@]}" >/dev/null; } || skip "could not install ${missing[*]} with apt-get"
fi
unshare --mount --uts --ipc --net --pid --fork true 2>/dev/null \
  || skip "this kernel or sandbox refuses the namespaces a container needs (unshare failed)"

WORK=$(mktemp -d /var/tmp/vpdsr-ci-image.XXXXXX)
free_gb=$(($(df --output=avail -k "$WORK" | tail -1) / 1024 / 1024))
if ((free_gb < NEED_GB)); then
  rmdir "$WORK"
  skip "only ${free_gb} GB free under /var/tmp, the build needs about ${NEED_GB} GB"
fi

TAG=${WORK##*.}
TAG=${TAG,,}
BASE=localhost/vpdsr-ci-base:$TAG
IMAGE=localhost/vpd-sr-ci:$TAG
NAME=vpdsr-ci-$TAG

# A private podman: its own store, run directory, temporary files and settings under $WORK.
export CONTAINERS_STORAGE_CONF=$WORK/storage.conf CONTAINERS_CONF=$WORK/containers.conf TMPDIR=$WORK/tmp
mkdir -p "$WORK/tmp"
cat >"$CONTAINERS_STORAGE_CONF" <<EOF
[storage]
driver = "overlay"
graphroot = "$WORK/storage"
runroot = "$WORK/run"
EOF
# Container ulimits: the host's hard limits, and no more than the kernel allows (an nproc above
# pid_max is refused on some VMs: "error setting rlimit type 6").
limit() { local n; n=$(ulimit -H "$1"); [ "$n" = unlimited ] || (("$n" > $2)) && n=$2; echo "$n:$n"; }
cat >"$CONTAINERS_CONF" <<EOF
[containers]
default_ulimits = ["nofile=$(limit -n "$(cat /proc/sys/fs/nr_open)")", "nproc=$(limit -u "$(cat /proc/sys/kernel/pid_max)")"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF

cleanup() {
  local rc=$?
  podman rm -f -t 0 "$NAME" >/dev/null 2>&1 || true
  podman rmi -af >/dev/null 2>&1 || true
  # Whatever is still mounted below $WORK (debootstrap's /proc after a failure, a container's
  # overlay), deepest first, before the folder goes.
  awk -v w="$WORK" 'index($2, w "/") == 1 {print $2}' /proc/self/mounts | sort -r | while read -r m; do
    umount -l "$m" || true
  done
  rm -rf --one-file-system "$WORK" || say "could not remove $WORK entirely"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

started=$SECONDS
phase() { say "$1 in $((SECONDS - started)) s"; started=$SECONDS; }

# -- the base: Debian bookworm with Python 3.11, made here -------------------------------------
say "making the base (debootstrap bookworm from $MIRROR)"
rootfs=$WORK/rootfs
for attempt in 1 2; do
  if debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
      bookworm "$rootfs" "$MIRROR" >"$WORK/debootstrap.log" 2>&1; then
    break
  fi
  # No base, no image: the mirror is out of reach, which says nothing about the project.
  ((attempt == 2)) && { tail -5 "$WORK/debootstrap.log" >&2; skip "debootstrap failed twice (Debian mirror unreachable?)"; }
  awk -v w="$rootfs" 'index($2, w "/") == 1 {print $2}' /proc/self/mounts | sort -r | xargs -r umount -l
  rm -rf --one-file-system "$rootfs"
done
# The host's CA certificates (a TLS-inspecting proxy's included), for pip as for apt.
cp -a /usr/local/share/ca-certificates/. "$rootfs/usr/local/share/ca-certificates/" 2>/dev/null || true
cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' >"$rootfs/etc/pip.conf"
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
tar --numeric-owner -C "$rootfs" -c . | podman import -q - "$BASE" >/dev/null
rm -rf --one-file-system "$rootfs"
podman run --rm --network none "$BASE" true 2>"$WORK/probe.log" \
  || skip "podman cannot start a container here: $(head -1 "$WORK/probe.log")"
phase "base ready"

# -- the build ---------------------------------------------------------------------------------
if curl -sfI --max-time 20 https://download.pytorch.org/whl/cpu/ >/dev/null 2>&1; then
  torch_index=https://download.pytorch.org/whl/cpu
else
  torch_index=https://pypi.org/simple  # PyTorch's CPU index is unreachable from here
fi
say "building the cpu variant (torch from $torch_index)"
build=(podman build --format docker --network host -f docker/Dockerfile
  --build-arg VARIANT=cpu --build-arg CPU_IMAGE="$BASE" --build-arg TORCH_INDEX_URL="$torch_index" -t "$IMAGE" .)
if ! "${build[@]}" >"$WORK/build.log" 2>&1; then
  # Once more, from the cached layers, in case a download broke off; a defect fails again.
  say "build failed, retrying once: $(grep -m1 -iE 'error|failed' "$WORK/build.log" || tail -1 "$WORK/build.log")"
  if ! "${build[@]}" >"$WORK/build.log" 2>&1; then
    tail -40 "$WORK/build.log" >&2
    # A download that broke off twice is the network's failure; anything else is the project's.
    grep -qiE "$NETWORK_ERRORS" "$WORK/build.log" && skip "podman build could not download its packages twice"
    die "podman build failed"
  fi
fi
size=$(podman image inspect --format '{{.Size}}' "$IMAGE")
[ "$(podman image inspect --format '{{.Config.Healthcheck}}' "$IMAGE")" != "<nil>" ] \
  || die "the image has no HEALTHCHECK (built without --format docker?)"
phase "image built ($((size / 1000000)) MB)"

# -- the container, hardened -------------------------------------------------------------------
podman run -d --name "$NAME" --network none --user 10001:10001 --read-only --tmpfs /tmp:rw,exec,mode=1777 \
  --cap-drop=ALL --security-opt no-new-privileges --health-cmd none \
  -e VPDSR_DEVICE=cpu -e VPDSR_REQUEST_TIMEOUT_S=900 "$IMAGE" >/dev/null
logs() { podman logs --tail 40 "$NAME" 2>&1 | sed 's/^/  | /' >&2; }
in_container() { podman exec "$NAME" python -c "$@" </dev/null; }

deadline=$((SECONDS + READY_S))
until in_container 'import urllib.request as u; u.urlopen("http://127.0.0.1:8000/readyz", timeout=5)' 2>/dev/null; do
  [ "$(podman inspect --format '{{.State.Running}}' "$NAME")" = true ] || { logs; die "the container exited before it was ready"; }
  ((SECONDS < deadline)) || { logs; die "not ready after ${READY_S} s"; }
  sleep 2
done
phase "ready (/readyz 200)"

[ "$(podman exec "$NAME" id -u)" = 10001 ] || die "the service does not run as uid 10001"
podman exec "$NAME" sh -c 'touch /opt/venv/x' 2>/dev/null && die "the root filesystem is writable"
# The image's own HEALTHCHECK command, as Docker would run it.
health=$(podman image inspect --format '{{json .Config.Healthcheck.Test}}' "$IMAGE")
in_container "import json, subprocess, sys; test = json.loads(sys.argv[1]); sys.exit(subprocess.run(test[1:]).returncode)" \
  "$health" || { logs; die "the image's HEALTHCHECK fails: $health"; }

# A real photo over HTTP, as the README's curl sends it: a 32×32 crop, a few tiles, and a long
# request timeout (above), so that a CPU shared with other work cannot turn the check into a 413.
client='
import io, json, sys, time, urllib.error, urllib.request
from PIL import Image
photo = Image.open(io.BytesIO(sys.stdin.buffer.read())).convert("RGB")
x, y = photo.width // 2, photo.height // 2
buffer = io.BytesIO()
photo.crop((x - 16, y - 16, x + 16, y + 16)).save(buffer, "JPEG", quality=95)
for attempt in range(10):
    request = urllib.request.Request("http://127.0.0.1:8000/v1/upscale?format=png", data=buffer.getvalue(),
                                     headers={"Content-Type": "image/jpeg"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=1000) as answer:
            body, headers = answer.read(), answer.headers
            break
    except urllib.error.HTTPError as err:
        if err.code not in (429, 503):
            sys.exit(f"{err.code} {err.read().decode()}")
        time.sleep(int(err.headers.get("Retry-After") or 2))
else:
    sys.exit("still busy after 10 attempts")
result = Image.open(io.BytesIO(body))
if (result.format, result.size) != ("PNG", (128, 128)):
    sys.exit(f"expected a 128x128 PNG, got {result.format} {result.size}")
print(json.dumps({"model": headers["X-Model"], "version": headers["X-Model-Version"],
                  "compute_ms": float(headers["X-Compute-Time-Ms"])}))
'
upscaled=$(podman exec -i "$NAME" python -c "$client" <tests/fixtures/images/108005.jpg 2>&1) \
  || { logs; die "the upscale failed: $upscaled"; }
say "upscaled a 32×32 crop of a photo to 128×128: $upscaled"

metrics='
import re, sys, urllib.request
text = urllib.request.urlopen("http://127.0.0.1:8000/metrics", timeout=10).read().decode()
def value(pattern):
    found = re.search(pattern + r" ([0-9.e+]+)$", text, re.M)
    return float(found.group(1)) if found else 0.0
tiles = value(r"^vpdsr_tiles_total")
ok = value(r"^vpdsr_requests_total\{[^}]*route=\"/v1/upscale\"[^}]*status=\"200\"[^}]*\}")
info = re.search(r"^vpdsr_model_info\{[^}]*\} 1\.0$", text, re.M)
if tiles < 1 or ok < 1 or not info:
    sys.exit(f"/metrics lacks the upscale: tiles {tiles}, 200s {ok}, model_info {bool(info)}")
print(f"tiles {tiles:g}, upscales {ok:g}, {info.group(0)}")
'
counted=$(in_container "$metrics" 2>&1) || { logs; die "$counted"; }
say "/metrics: $counted"
phase "checks passed"
say "passed"
