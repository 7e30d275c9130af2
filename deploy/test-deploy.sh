#!/usr/bin/env bash
# `make test-deploy`: build the image and run docker-compose.yml for real, with podman on the
# host network (deploy/compose.test.yml), then score contrastive rewards through it.
#
# On a Debian machine as root: installs podman, runc and debootstrap (apt) and podman-compose
# (PyPI, in a venv of its own) when missing; builds a bookworm base image with debootstrap,
# since no image registry may be reachable, and a Redis image on it; builds the CPU image of
# deploy/Dockerfile; serves a tiny model with Redis; pushes baselines and checks that rewards
# come back contrastive from the cache; stops everything it started, whatever happens.
# Images are cached by tag and layer, so a second run only re-runs the containers; with the
# argument `build` it stops once the images are built.
#
# Needs the project's .venv (make setup): crs-service tiny-model, crs-trainer push-baselines.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
work=${CRS_TEST_WORK:-$root/.crs/test-deploy}
venv_bin=${VENV_BIN:-$root/.venv/bin}
project=crs-test-deploy
base_image=localhost/crs-test-base:bookworm
export CRS_TEST_REDIS_IMAGE=localhost/crs-test-redis:bookworm
export CRS_TEST_IMAGE=localhost/crs:test-cpu
torch_spec=${CRS_TEST_TORCH:-torch==2.13.0+cpu}
podman=(podman --runtime /usr/sbin/runc --cgroup-manager cgroupfs)
compose=()
mkdir -p "$work"

stage_start=$SECONDS
stage() {
    echo "== $1"
    stage_start=$SECONDS
}
stage_done() {
    echo "-- $1: $((SECONDS - stage_start)) s"
    timings+=("$1 $((SECONDS - stage_start))s")
}
timings=()
fail() {
    echo "test-deploy: FAILED: $*" >&2
    exit 1
}

install_tools() {
    local missing=()
    command -v podman >/dev/null || missing+=(podman)
    [ -x /usr/sbin/runc ] || missing+=(runc)
    command -v debootstrap >/dev/null || missing+=(debootstrap)
    if [ ${#missing[@]} -gt 0 ]; then
        apt-get update -q >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null
    fi
    if [ ! -x "$work/tools/bin/podman-compose" ]; then
        python3 -m venv "$work/tools"
        "$work/tools/bin/pip" install -q "podman-compose==1.6.0"
    fi
    # A private containers.conf: no default ulimits (a nested or unprivileged host may refuse
    # to set them), cgroupfs and runc (no systemd here), events to a file.
    cat >"$work/containers.conf" <<'EOF'
[containers]
default_ulimits = []

[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
runtime = "runc"
EOF
    export CONTAINERS_CONF=$work/containers.conf
    compose=("$work/tools/bin/podman-compose" -p "$project"
        -f docker-compose.yml -f deploy/compose.test.yml)
}

build_redis_image() {
    "${podman[@]}" image exists "$CRS_TEST_REDIS_IMAGE" && return
    mkdir -p "$work/redis-context"
    "${podman[@]}" build -q --network host -t "$CRS_TEST_REDIS_IMAGE" \
        -f - "$work/redis-context" >/dev/null <<EOF
FROM $base_image
RUN apt-get update -q && apt-get install -y -q --no-install-recommends redis-server \\
    && rm -rf /var/lib/apt/lists/* && mkdir -p /data
EOF
}

build_image() {
    # The torch wheel lies in the build context: the build reaches no PyTorch index.
    if ! compgen -G "deploy/wheels/torch-*.whl" >/dev/null; then
        "$venv_bin/python" -m pip download -q --no-deps --only-binary=:all: \
            --python-version 3.11 --platform "manylinux_2_28_$(uname -m)" \
            --index-url https://download.pytorch.org/whl/cpu "$torch_spec" -d deploy/wheels \
            2>"$work/wheel.log" || { cat "$work/wheel.log" >&2; fail "pip download $torch_spec"; }
    fi
    "${podman[@]}" build --format docker --network host \
        --build-arg BASE_IMAGE="$base_image" --build-arg TORCH_VARIANT=cpu \
        -f deploy/Dockerfile -t "$CRS_TEST_IMAGE" . >"$work/build.log" 2>&1 || {
        tail -n 30 "$work/build.log" >&2
        fail "image build (log: $work/build.log)"
    }
    local size
    size=$("${podman[@]}" image inspect --format '{{.Size}}' "$CRS_TEST_IMAGE")
    echo "image $CRS_TEST_IMAGE: $((size / 1000000)) MB"
    local healthcheck
    healthcheck=$("${podman[@]}" image inspect --format '{{json .Config.Healthcheck}}' "$CRS_TEST_IMAGE")
    [[ $healthcheck == *readyz* ]] || fail "the image has no /readyz HEALTHCHECK"
}

free_port() {
    "$venv_bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Podman runs healthchecks from systemd timers, which a container host without systemd lacks,
# and podman-compose cannot wait for `service_healthy` on an older podman: run them ourselves.
wait_healthy() {
    local container=$1 deadline=$((SECONDS + $2))
    until "${podman[@]}" healthcheck run "$container" >/dev/null 2>&1; do
        [ "$("${podman[@]}" inspect --format '{{.State.Running}}' "$container")" = true ] ||
            { "${podman[@]}" logs --tail 30 "$container" >&2; fail "$container exited"; }
        [ $SECONDS -lt "$deadline" ] ||
            { "${podman[@]}" logs --tail 30 "$container" >&2; fail "$container never healthy"; }
        sleep 1
    done
}

teardown() {
    local status=$?
    if [ ${#compose[@]} -gt 0 ]; then
        "${compose[@]}" down -v -t 20 >/dev/null 2>&1 || true
        "${compose[@]}" --profile example down -v -t 20 >/dev/null 2>&1 || true
        "${podman[@]}" rm -f -t 5 crs-test-deploy-trainer crs-test-deploy-reward \
            crs-test-deploy-redis >/dev/null 2>&1 || true
        if "${podman[@]}" ps -a --format '{{.Names}}' | grep -q '^crs-test-deploy-'; then
            echo "test-deploy: containers left running" >&2
            status=1
        fi
    fi
    exit "$status"
}
trap teardown EXIT

stage "tools"
install_tools
stage_done "tools"

stage "base image"
"$root/deploy/base-image.sh" "$base_image" "$work"
build_redis_image
stage_done "base image"

stage "image build"
build_image
stage_done "image build"
if [ "${1:-}" = build ]; then
    # `test-deploy.sh build`: the images only (CI builds them while the tests run); a later
    # full run finds them cached and only re-runs the containers.
    echo "test-deploy: images built (${timings[*]})"
    exit 0
fi

stage "up"
if [ ! -f "$work/model/config.json" ]; then
    rm -rf "$work/model"
    "$venv_bin/crs-service" tiny-model "$work/model" --arch llama >/dev/null 2>&1
fi
# The service runs as uid 10001 and only reads the model (safetensors may save it as 0600).
chmod -R a+rX "$work/model"
export CRS_TEST_MODEL_DIR=$work/model CRS_MODEL_DIR=$work/model
CRS_TEST_PORT=$(free_port)
CRS_TEST_REDIS_PORT=$(free_port)
token=$("$venv_bin/python" -c 'import secrets; print(secrets.token_urlsafe(24))')
export CRS_TEST_PORT CRS_TEST_REDIS_PORT CRS_API_TOKENS=$token
"${compose[@]}" down -v -t 5 >/dev/null 2>&1 || true
# Redis first and healthy, then the service: what depends_on service_healthy asks for.
"${compose[@]}" up -d --no-build redis >"$work/up.log" 2>&1 || { cat "$work/up.log" >&2; fail "up redis"; }
wait_healthy crs-test-deploy-redis 60
"${compose[@]}" up -d --no-build --no-deps reward >>"$work/up.log" 2>&1 ||
    { cat "$work/up.log" >&2; fail "up reward"; }
wait_healthy crs-test-deploy-reward 300
stage_done "up"

stage "test"
url=http://127.0.0.1:$CRS_TEST_PORT
[ "$("${podman[@]}" exec crs-test-deploy-reward id -u)" != 0 ] || fail "the service runs as root"
cat >"$work/baselines.jsonl" <<'EOF'
{"prompt": "What is the capital of France?", "prompt_id": "deploy-france", "responses": ["Paris.", "It is Paris.", "Lyon?"]}
{"prompt": "Name a prime number.", "prompt_id": "deploy-prime", "responses": ["7", "Two.", "Nine."]}
EOF
CRS_API_TOKEN=$token "$venv_bin/crs-trainer" push-baselines "$work/baselines.jsonl" --url "$url" --quiet
keys=$("${podman[@]}" exec crs-test-deploy-redis redis-cli -p "$CRS_TEST_REDIS_PORT" --scan --pattern 'crs:*' | wc -l)
[ "$keys" -ge 4 ] || fail "expected the baselines in the compose Redis, found $keys crs:* keys"
CRS_API_TOKEN=$token "$venv_bin/python" - "$url" <<'EOF'
import os
import sys

import httpx

url = sys.argv[1]
items = [
    {"prompt": "What is the capital of France?", "prompt_id": "deploy-france", "response": "Paris"},
    {"prompt": "Name a prime number.", "prompt_id": "deploy-prime", "response": "Three."},
    {"prompt": "No baseline here.", "prompt_id": "deploy-none", "response": "None."},
]
body = {"items": items, "contrastive": {"aggregate": "mean"}}
anonymous = httpx.post(f"{url}/v1/rewards", json=body, timeout=30)
assert anonymous.status_code == 401, f"no token: expected 401, got {anonymous.status_code}"
headers = {"Authorization": f"Bearer {os.environ['CRS_API_TOKEN']}"}
# CRS_ADMIN_TOKEN unset in the environment: the admin plane does not exist.
admin = httpx.post(f"{url}/admin/models", json={"path": "/models"}, headers=headers, timeout=30)
assert admin.status_code == 404, f"admin plane without CRS_ADMIN_TOKEN: {admin.status_code}"
answer = httpx.post(f"{url}/v1/rewards", json=body, headers=headers, timeout=60)
assert answer.status_code == 200, f"expected 200, got {answer.status_code}: {answer.text}"
results = answer.json()["results"]
sources = [result["baseline_source"] for result in results]
assert sources == ["cache", "cache", "missing"], f"baseline sources {sources}"
for result in results[:2]:
    assert result["contrastive"] is not None, f"contrastive is null: {result}"
    expected = result["reward"] - result["baseline"]
    assert abs(result["contrastive"] - expected) < 1e-6, f"contrastive != reward - baseline: {result}"
print(f"rewards: {len(results)} results, sources {sources}, model {answer.json()['model']['version']}")
EOF
if [ "${CRS_TEST_EXAMPLE:-0}" = 1 ]; then
    # The example profile's trainer: samples, pushes and trains two PPO iterations against it.
    "${compose[@]}" --profile example up -d --no-build --no-deps trainer >>"$work/up.log" 2>&1 ||
        { cat "$work/up.log" >&2; fail "up trainer"; }
    code=$("${podman[@]}" wait crs-test-deploy-trainer)
    "${podman[@]}" logs crs-test-deploy-trainer 2>&1 | tail -n 5
    [ "$code" = 0 ] || fail "the example trainer exited $code"
fi
# A stop drains and exits 0 well within the grace period (STOPSIGNAL SIGTERM).
"${podman[@]}" stop -t 150 crs-test-deploy-reward >/dev/null 2>"$work/stop.log"
code=$("${podman[@]}" inspect --format '{{.State.ExitCode}}' crs-test-deploy-reward)
[ "$code" = 0 ] || { "${podman[@]}" logs --tail 30 crs-test-deploy-reward >&2; fail "exit code $code after SIGTERM"; }
stage_done "test"

echo "test-deploy: passed (${timings[*]})"
