"""The deploy files hold what a deployment relies on: docker-compose.yml, deploy/Dockerfile,
deploy/redis.conf and .env.example, read as text and YAML (no container runs here; `make
test-deploy` runs them). Each check is a function that lists problems; every one is run on the
real files (no problem) and on a copy broken on purpose (its problem found), so none can pass
by checking nothing."""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
REDIS_CONF = ROOT / "deploy" / "redis.conf"
ENV_EXAMPLE = ROOT / ".env.example"

TOKEN_VARIABLES = ("CRS_API_TOKENS", "CRS_ADMIN_TOKEN")
REQUIRED = re.compile(r"^\$\{(\w+):\?[^}]+\}$")
# ${VAR}, ${VAR:-default}, ${VAR:?message}; $${...} is a literal dollar for the container's shell.
INTERPOLATED = re.compile(r"(?<!\$)\$\{(\w+)")
DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(h|ms|m|s)")
SECONDS_PER = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
MIN_START_PERIOD_S = 300.0

Compose = dict[str, Any]
Problems = list[str]


def duration_s(value: str | int | float) -> float:
    """A compose duration ("150s", "2m30s", "1h") in seconds."""
    if isinstance(value, int | float):
        return float(value)
    parts = DURATION_PART.findall(value)
    if not parts or "".join(n + u for n, u in parts) != value:
        raise ValueError(f"not a compose duration: {value!r}")
    return sum(float(number) * SECONDS_PER[unit] for number, unit in parts)


def service(compose: Compose, name: str) -> dict[str, Any]:
    """One service's definition, {} when absent."""
    found = compose.get("services", {}).get(name)
    return found if isinstance(found, dict) else {}


def environment(definition: dict[str, Any]) -> dict[str, Any]:
    """A service's environment as a mapping, whichever of the two forms it is written in."""
    env = definition.get("environment") or {}
    if isinstance(env, list):
        pairs = [entry.partition("=") for entry in env]
        return {key: (value if sep else None) for key, sep, value in pairs}
    return dict(env)


# --- compose checks -------------------------------------------------------------------------


def check_services(compose: Compose) -> Problems:
    return [f"no service {name}" for name in ("redis", "reward") if not service(compose, name)]


def check_healthchecks(compose: Compose) -> Problems:
    expected = {"redis": "ping", "reward": "/readyz"}
    problems = []
    for name, probe in expected.items():
        test = service(compose, name).get("healthcheck", {}).get("test")
        if not test or probe not in " ".join(test if isinstance(test, list) else [test]):
            problems.append(f"{name}: no healthcheck probing {probe}")
    return problems


def check_start_period(compose: Compose) -> Problems:
    period = service(compose, "reward").get("healthcheck", {}).get("start_period", "0s")
    if duration_s(period) < MIN_START_PERIOD_S:
        return [f"reward: start_period {period} is too short to load a large model"]
    return []


def check_gpu(compose: Compose) -> Problems:
    deploy = service(compose, "reward").get("deploy", {})
    devices = deploy.get("resources", {}).get("reservations", {}).get("devices", [])
    for device in devices:
        if (
            device.get("driver") == "nvidia"
            and device.get("count") == 1
            and "gpu" in device.get("capabilities", [])
        ):
            return []
    return ["reward: no reservation of one nvidia gpu"]


def check_model_read_only(compose: Compose) -> Problems:
    volumes = service(compose, "reward").get("volumes", [])
    if any(isinstance(v, str) and v.endswith(":/models:ro") for v in volumes):
        return []
    return ["reward: the model directory is not mounted read-only at /models"]


def check_token_defaults(compose: Compose) -> Problems:
    problems = []
    for name, definition in compose.get("services", {}).items():
        env = environment(definition)
        for variable in TOKEN_VARIABLES:
            if variable not in env or env[variable] is None:
                continue  # absent, or passed through from the environment only when set
            match = REQUIRED.match(str(env[variable]))
            if not match or match.group(1) != variable:
                problems.append(f"{name}: {variable} is neither required nor passed through")
    return problems


def check_redis_url(compose: Compose) -> Problems:
    url = environment(service(compose, "reward")).get("CRS_REDIS_URL", "")
    if not str(url).startswith("redis://redis:6379/"):
        return ["reward: CRS_REDIS_URL does not name the redis service"]
    return []


def check_grace_period(compose: Compose) -> Problems:
    reward = service(compose, "reward")
    env = environment(reward)
    try:
        drain = float(env["CRS_SHUTDOWN_TIMEOUT_S"]) + float(env["CRS_DRAIN_MIN_S"])
    except (KeyError, TypeError, ValueError):
        return ["reward: CRS_SHUTDOWN_TIMEOUT_S and CRS_DRAIN_MIN_S must be set to numbers"]
    grace = duration_s(reward.get("stop_grace_period", "10s"))  # the engines' default
    if grace <= drain:
        return [f"reward: stop_grace_period {grace} s does not outlast the drain ({drain} s)"]
    return []


def check_depends_on_redis(compose: Compose) -> Problems:
    depends = service(compose, "reward").get("depends_on", {})
    if isinstance(depends, dict) and depends.get("redis", {}).get("condition") == (
        "service_healthy"
    ):
        return []
    return ["reward: does not wait for redis to be healthy"]


def check_restart(compose: Compose) -> Problems:
    return [
        f"{name}: restart policy is not unless-stopped"
        for name in ("redis", "reward")
        if service(compose, name).get("restart") != "unless-stopped"
    ]


def check_redis_private(compose: Compose) -> Problems:
    return ["redis: its port is published"] if service(compose, "redis").get("ports") else []


def check_example_profile(compose: Compose) -> Problems:
    for name, definition in compose.get("services", {}).items():
        if "example" in definition.get("profiles", []):
            depends = definition.get("depends_on", {})
            reward = depends.get("reward", {}) if isinstance(depends, dict) else {}
            if reward.get("condition") != "service_healthy":
                return [f"{name}: the example does not wait for a healthy reward service"]
            return []
    return ["no service in the example profile"]


def check_core_not_profiled(compose: Compose) -> Problems:
    return [
        f"{name}: in a profile, so a plain `up` would not start it"
        for name in ("redis", "reward")
        if service(compose, name).get("profiles")
    ]


COMPOSE_CHECKS: dict[str, Callable[[Compose], Problems]] = {
    "services": check_services,
    "healthchecks": check_healthchecks,
    "start_period": check_start_period,
    "gpu": check_gpu,
    "model_read_only": check_model_read_only,
    "token_defaults": check_token_defaults,
    "redis_url": check_redis_url,
    "grace_period": check_grace_period,
    "depends_on_redis": check_depends_on_redis,
    "restart": check_restart,
    "redis_private": check_redis_private,
    "example_profile": check_example_profile,
    "core_not_profiled": check_core_not_profiled,
}


def set_path(compose: Compose, path: str, value: Any) -> Compose:
    """A copy of ``compose`` with the dotted ``path`` set to ``value`` (None deletes it)."""
    broken = copy.deepcopy(compose)
    *parents, last = path.split(".")
    node = broken
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    index: Any = int(last) if isinstance(node, list) else last
    if value is None:
        del node[index]
    else:
        node[index] = value
    return broken


# Each check and a way of breaking the real file that it must notice.
BREAKAGES = [
    ("services", "services.redis", None),
    ("healthchecks", "services.reward.healthcheck", None),
    ("healthchecks", "services.redis.healthcheck.test", ["CMD", "true"]),
    ("start_period", "services.reward.healthcheck.start_period", "60s"),
    ("gpu", "services.reward.deploy", None),
    ("gpu", "services.reward.deploy.resources.reservations.devices.0.driver", "amd"),
    ("model_read_only", "services.reward.volumes", ["/srv/rm:/models"]),
    ("token_defaults", "services.reward.environment.CRS_API_TOKENS", "${CRS_API_TOKENS:-tok}"),
    ("token_defaults", "services.reward.environment.CRS_ADMIN_TOKEN", "change-me-admin"),
    ("token_defaults", "services.trainer.environment.CRS_API_TOKENS", "${CRS_API_TOKENS:-}"),
    ("redis_url", "services.reward.environment.CRS_REDIS_URL", "redis://127.0.0.1:6379/0"),
    ("grace_period", "services.reward.stop_grace_period", "130s"),
    ("grace_period", "services.reward.environment.CRS_DRAIN_MIN_S", None),
    ("depends_on_redis", "services.reward.depends_on", ["redis"]),
    ("restart", "services.redis.restart", "no"),
    ("redis_private", "services.redis.ports", ["6379:6379"]),
    ("example_profile", "services.trainer.profiles", ["demo"]),
    ("example_profile", "services.trainer.depends_on", ["reward"]),
    ("core_not_profiled", "services.reward.profiles", ["gpu"]),
]


@pytest.fixture(scope="module")
def compose() -> Compose:
    loaded = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(loaded, dict)
    return loaded


@pytest.mark.parametrize("check", COMPOSE_CHECKS, ids=str)
def test_compose_holds(compose: Compose, check: str) -> None:
    assert COMPOSE_CHECKS[check](compose) == []


@pytest.mark.parametrize(("check", "path", "value"), BREAKAGES)
def test_compose_check_catches(compose: Compose, check: str, path: str, value: Any) -> None:
    assert COMPOSE_CHECKS[check](set_path(compose, path, value)) != []


def test_every_check_can_fail() -> None:
    assert {check for check, _, _ in BREAKAGES} == set(COMPOSE_CHECKS)


@pytest.mark.parametrize(
    ("text", "seconds"), [("150s", 150.0), ("2m30s", 150.0), ("1h", 3600.0), (90, 90.0)]
)
def test_duration(text: str | int, seconds: float) -> None:
    assert duration_s(text) == seconds


def test_duration_refuses_garbage() -> None:
    with pytest.raises(ValueError, match="not a compose duration"):
        duration_s("soon")


# --- no literal tokens anywhere in the compose text ------------------------------------------


def literal_tokens(text: str) -> Problems:
    """Token variables given a literal value or a non-empty default in compose text."""
    problems = []
    for variable in TOKEN_VARIABLES:
        for match in re.finditer(
            rf"^[ \t]*-?[ \t]*{variable}[ \t]*[:=][ \t]*(\S.*)$", text, re.MULTILINE
        ):
            value = match.group(1).strip().strip("\"'")
            if not REQUIRED.match(value):
                problems.append(f"{variable}: {value[:12]}...")
        if re.search(rf"\$\{{{variable}:?-[^}}]", text):
            problems.append(f"{variable} has a default")
    return problems


@pytest.mark.parametrize(
    ("replace", "by"),
    [
        ("CRS_ADMIN_TOKEN:\n", "CRS_ADMIN_TOKEN: hunter2-hunter2\n"),
        ("${CRS_API_TOKENS:?", "${CRS_API_TOKENS:-secret-token}${UNUSED:?"),
    ],
)
def test_literal_tokens_found(replace: str, by: str) -> None:
    text = COMPOSE.read_text()
    assert replace in text
    assert literal_tokens(text.replace(replace, by, 1)) != []


def test_no_literal_tokens() -> None:
    assert literal_tokens(COMPOSE.read_text()) == []


# --- .env.example ---------------------------------------------------------------------------


def compose_variables(text: str) -> set[str]:
    """Variables the compose file reads: interpolated, or passed through (no value)."""
    loaded = yaml.safe_load(text)
    passed = {
        key
        for definition in loaded.get("services", {}).values()
        for key, value in environment(definition).items()
        if value is None
    }
    return set(INTERPOLATED.findall(text)) | passed


def documented(text: str) -> set[str]:
    """Variables .env.example sets or shows commented out."""
    return set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]*)=", text, re.MULTILINE))


def test_compose_reads_variables() -> None:
    # The check below means something only if the file reads variables at all.
    assert {"CRS_API_TOKENS", "CRS_MODEL_DIR", "CRS_ADMIN_TOKEN"} <= compose_variables(
        COMPOSE.read_text()
    )


def test_env_example_lists_every_variable() -> None:
    missing = compose_variables(COMPOSE.read_text()) - documented(ENV_EXAMPLE.read_text())
    assert missing == set()


def test_env_example_check_catches_a_new_variable() -> None:
    text = COMPOSE.read_text().replace("${CRS_LOG_LEVEL:-info}", "${CRS_NEW_SETTING:-info}")
    assert "CRS_NEW_SETTING" in compose_variables(text) - documented(ENV_EXAMPLE.read_text())


@pytest.mark.parametrize("variable", TOKEN_VARIABLES)
def test_env_example_has_no_token_values(variable: str) -> None:
    values = re.findall(rf"^#?\s*{variable}=(.*)$", ENV_EXAMPLE.read_text(), re.MULTILINE)
    assert values == [""]


# --- deploy/Dockerfile ----------------------------------------------------------------------


def stages(dockerfile: str) -> list[str]:
    """The Dockerfile's stages, each from its FROM line."""
    parts = re.split(r"^(?=FROM\s)", dockerfile, flags=re.MULTILINE)
    return [part for part in parts if part.startswith("FROM")]


def final_stage(dockerfile: str) -> str:
    found = stages(dockerfile)
    return found[-1] if found else ""


def last_user(stage: str) -> str | None:
    users = re.findall(r"^USER\s+(\S+)", stage, re.MULTILINE)
    return users[-1] if users else None


DOCKERFILE_CHECKS: dict[str, Callable[[str], bool]] = {
    "multi_stage": lambda text: len(stages(text)) >= 2,
    "runtime_copies_the_venv": lambda text: bool(
        re.search(r"^COPY --from=\w+ /opt/venv /opt/venv$", final_stage(text), re.MULTILINE)
    ),
    "non_root_user": lambda text: last_user(final_stage(text)) not in (None, "root", "0"),
    "healthcheck_readyz": lambda text: bool(
        re.search(r"^HEALTHCHECK\s.*\\\n.*/readyz", final_stage(text), re.MULTILINE)
    ),
    "entrypoint": lambda text: 'ENTRYPOINT ["crs-service", "serve"]' in final_stage(text),
    "stopsignal": lambda text: "STOPSIGNAL SIGTERM" in final_stage(text),
    "listens_inside_container": lambda text: "CRS_HOST=0.0.0.0" in final_stage(text),
    "no_build_tools_at_runtime": lambda text: (
        not re.search(r"apt-get|apk add|gcc|build-essential|pip install", final_stage(text))
    ),
    "no_secrets_baked": lambda text: (
        not re.search(r"^[^#\n]*CRS_(API|ADMIN)_TOKEN", text, re.MULTILINE)
    ),
    **{
        f"build_arg_{arg}": (lambda text, arg=arg: bool(re.search(rf"^ARG {arg}\b", text, re.M)))
        for arg in ("BASE_IMAGE", "TORCH_VARIANT", "TORCH_SPEC", "TORCH_INDEX_URL")
    },
}

DOCKERFILE_BREAKAGES = {
    "multi_stage": ("\nFROM ", "\nRUN echo "),
    "runtime_copies_the_venv": ("COPY --from=venv /opt/venv /opt/venv", "COPY . /opt/venv"),
    "non_root_user": ("USER crs", "USER root"),
    "healthcheck_readyz": ("/readyz", "/livez"),
    "entrypoint": ('ENTRYPOINT ["crs-service", "serve"]', 'ENTRYPOINT ["python"]'),
    "stopsignal": ("STOPSIGNAL SIGTERM", "STOPSIGNAL SIGKILL"),
    "listens_inside_container": ("CRS_HOST=0.0.0.0", "CRS_HOST=127.0.0.1"),
    "no_build_tools_at_runtime": ("USER crs", "RUN apt-get install -y gcc\nUSER crs"),
    "no_secrets_baked": ("USER crs", "ENV CRS_API_TOKENS=abcdefgh12\nUSER crs"),
    **{
        f"build_arg_{arg}": (f"ARG {arg}", f"ARG X_{arg}")
        for arg in ("BASE_IMAGE", "TORCH_VARIANT", "TORCH_SPEC", "TORCH_INDEX_URL")
    },
}


@pytest.mark.parametrize("check", DOCKERFILE_CHECKS, ids=str)
def test_dockerfile_holds(check: str) -> None:
    assert DOCKERFILE_CHECKS[check](DOCKERFILE.read_text())


@pytest.mark.parametrize("check", DOCKERFILE_BREAKAGES, ids=str)
def test_dockerfile_check_catches(check: str) -> None:
    old, new = DOCKERFILE_BREAKAGES[check]
    text = DOCKERFILE.read_text()
    assert old in text
    assert not DOCKERFILE_CHECKS[check](text.replace(old, new))


def test_every_dockerfile_check_can_fail() -> None:
    assert set(DOCKERFILE_BREAKAGES) == set(DOCKERFILE_CHECKS)


# --- deploy/redis.conf ----------------------------------------------------------------------


def redis_directives(text: str) -> dict[str, str]:
    """The last value of each directive, as Redis reads them."""
    found = {}
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.strip().partition(" ")
            found[name.lower()] = value.strip()
    return found


@pytest.mark.parametrize(
    ("directive", "value"),
    [("maxmemory-policy", "noeviction"), ("appendonly", "yes"), ("appendfsync", "everysec")],
)
def test_redis_conf(directive: str, value: str) -> None:
    assert redis_directives(REDIS_CONF.read_text()).get(directive) == value


def test_redis_conf_check_catches() -> None:
    broken = REDIS_CONF.read_text() + "\nmaxmemory-policy allkeys-lru\n"
    assert redis_directives(broken)["maxmemory-policy"] == "allkeys-lru"


def test_compose_mounts_redis_conf(compose: Compose) -> None:
    assert "./deploy/redis.conf:/usr/local/etc/redis/redis.conf:ro" in service(
        compose, "redis"
    ).get("volumes", [])
