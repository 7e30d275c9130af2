"""`crs-service models`: the admin client against a scripted fake fleet.

Each fake replica implements the admin plane and ``GET /v1/models`` of the spec behind an
``httpx.MockTransport``; its versions move through scripted states (loading, ready, active,
failed, draining) one step per listing, and every call is written to one log shared by the
fleet, so the tests can check the order a rollout touched the replicas in.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from service.admin_cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE, run_models
from service.cli import build_parser

ADMIN_TOKEN = "admin-s3cret-7f1c"
API_TOKEN = "api-s3cret-99ab"
ENV = {"CRS_ADMIN_TOKEN": ADMIN_TOKEN, "CRS_API_TOKEN": API_TOKEN}


def version_of(path: str, name: str = "rm") -> str:
    return f"{name}@{hashlib.sha256(path.encode()).hexdigest()[:8]}"


def envelope(status: int, error_type: str, message: str) -> httpx.Response:
    body = {"error": {"type": error_type, "message": message, "details": None}}
    return httpx.Response(status, json=body)


Step = dict[str, Any]  # fields of a version to set, or {"gone": True}


@dataclass
class FakeReplica:
    """One replica: its versions, the scripts they follow and how it answers."""

    host: str
    log: list[tuple[str, ...]]
    admin_plane: bool = True
    versions: dict[str, dict[str, Any]] = field(default_factory=dict)
    scripts: dict[str, list[Step]] = field(default_factory=dict)
    fail_load: str | None = None  # the error a load ends with
    never_ready: bool = False  # a load stays loading
    busy: bool = False  # another admin operation on the name runs: 409
    not_ready_after_change: int = 0  # /readyz answers 503 this many times after a change
    _not_ready: int = 0

    def add(self, path: str, state: str, *, name: str = "rm", **extra: Any) -> str:
        version = version_of(path, name)
        self.versions[version] = {
            "name": name,
            "version": version,
            "path": path,
            "state": state,
            "error": None,
            "in_flight": 0,
            "loaded_at": 1.7e9,
            "activated_at": None,
            "default": name == "rm",
            "rebaseline": None,
            **extra,
        }
        return version

    def handle(self, request: httpx.Request) -> httpx.Response:
        path, method = request.url.path, request.method
        if path == "/readyz":
            return self.readyz()
        if path == "/v1/models":
            if request.headers.get("authorization") != f"Bearer {API_TOKEN}":
                return envelope(401, "unauthorized", "missing or wrong API token")
            self.log.append((self.host, "list"))
            return self.listing()
        if not path.startswith("/admin/") or not self.admin_plane:
            return envelope(404, "not_found", "Not Found")
        if request.headers.get("authorization") != f"Bearer {ADMIN_TOKEN}":
            return envelope(401, "unauthorized", "missing or wrong admin token")
        if self.busy:
            return envelope(409, "conflict", "another admin operation on rm is running")
        body = json.loads(request.content) if request.content else {}
        if path == "/admin/models" and method == "POST":
            return self.load(body)
        version = path.removeprefix("/admin/models/").removesuffix("/activate")
        if version not in self.versions:
            return envelope(404, "not_found", f"no version {version} is loaded")
        if method == "POST":
            return self.activate(version)
        return self.unload(version)

    def load(self, body: dict[str, Any]) -> httpx.Response:
        version = version_of(body["path"], body.get("name", "rm"))
        self.log.append((self.host, "load", version, "activate" if body["activate"] else "-"))
        if version in self.versions:
            return envelope(409, "conflict", f"{version} is already loaded")
        self.add(body["path"], "loading", name=body.get("name", "rm"), default=False)
        if self.never_ready:
            self.scripts[version] = []
        elif self.fail_load is not None:
            self.scripts[version] = [{}, {"state": "failed", "error": self.fail_load}]
        elif body["activate"]:
            running = {"state": "running", "prompts_total": 4, "responses_scored": 0}
            self.scripts[version] = [
                {},
                {"state": "ready", "rebaseline": {**running, "prompts_done": 0}},
                {"rebaseline": {**running, "prompts_done": 2}},
                {"activate": True, "rebaseline": {**running, "state": "done", "prompts_done": 4}},
            ]
        else:
            self.scripts[version] = [{}, {}, {"state": "ready"}]
        return httpx.Response(
            202, json={"name": "rm", "version": version, "state": "loading", "path": body["path"]}
        )

    def activate(self, version: str) -> httpx.Response:
        entry = self.versions[version]
        if entry["state"] not in ("ready", "active"):
            return envelope(409, "conflict", f"{version} is {entry['state']}")
        previous = self.active(entry["name"])
        self.log.append((self.host, "activate", version))
        self.make_active(version)
        return httpx.Response(
            200,
            json={
                "name": entry["name"],
                "version": version,
                "state": "active",
                "previous": previous,
                "changed": previous != version,
            },
        )

    def unload(self, version: str) -> httpx.Response:
        entry = self.versions[version]
        if entry["state"] == "active":
            return envelope(409, "conflict", f"{version} is active")
        self.log.append((self.host, "unload", version))
        entry["state"] = "draining"
        self.scripts[version] = [{}, {"gone": True}]
        self._not_ready = self.not_ready_after_change
        return httpx.Response(200, json={"name": "rm", "version": version, "state": "unloaded"})

    def active(self, name: str) -> str | None:
        return next(
            (v for v, e in self.versions.items() if e["name"] == name and e["state"] == "active"),
            None,
        )

    def make_active(self, version: str) -> None:
        name = self.versions[version]["name"]
        if (old := self.active(name)) not in (None, version):
            del self.versions[old]  # drained and unloaded at once, here
        self.versions[version]["state"] = "active"
        self._not_ready = self.not_ready_after_change

    def listing(self) -> httpx.Response:
        for version, script in list(self.scripts.items()):
            if not script:
                continue
            step = script.pop(0)
            if step.get("gone"):
                del self.versions[version]
                continue
            if step.pop("activate", False):
                self.make_active(version)
            self.versions[version].update(step)
        names = sorted({e["name"] for e in self.versions.values()})
        return httpx.Response(
            200,
            json={
                "active": {"name": "rm", "version": self.active("rm")},
                "default": "rm",
                "active_versions": {name: self.active(name) for name in names},
                "models": list(self.versions.values()),
            },
        )

    def readyz(self) -> httpx.Response:
        if self._not_ready > 0:
            self._not_ready -= 1
            return envelope(503, "not_ready", "model is warming")
        self.log.append((self.host, "ready"))
        return httpx.Response(200, json={"status": "ready"})


class FakeFleet:
    """Replicas by host, behind one transport; ``down`` hosts refuse connections."""

    def __init__(self, *hosts: str, down: tuple[str, ...] = ()) -> None:
        self.log: list[tuple[str, ...]] = []
        self.replicas = {host: FakeReplica(host, self.log) for host in hosts}
        self.down = down
        self.transport = httpx.MockTransport(self.handle)

    def __getitem__(self, host: str) -> FakeReplica:
        return self.replicas[host]

    def handle(self, request: httpx.Request) -> httpx.Response:
        if request.url.host in self.down:
            raise httpx.ConnectError("[Errno 111] Connection refused", request=request)
        return self.replicas[request.url.host].handle(request)

    def calls(self, kind: str) -> list[tuple[str, ...]]:
        return [entry for entry in self.log if entry[1] == kind]

    def index(self, *entry: str) -> int:
        return self.log.index(entry)


def url(host: str) -> str:
    return f"http://{host}:8000"


class FakeTime:
    """The waits' clock: a sleep moves it on at once, so a wait that never ends meets its
    --timeout in a few thousand polls instead of hanging the test."""

    def __init__(self) -> None:
        self.now = 0.0

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds
        await asyncio.sleep(0)


@dataclass
class Result:
    code: int
    out: str
    err: str


def crs(fleet: FakeFleet, *argv: str, env: dict[str, str] | None = None) -> Result:
    """``crs-service models ARGV...`` through the real parser, against the fake fleet."""
    args = build_parser().parse_args(["models", *argv])
    out, err = io.StringIO(), io.StringIO()
    time = FakeTime()
    code = run_models(
        args,
        transport=fleet.transport,
        environ=ENV if env is None else env,
        stdout=out,
        stderr=err,
        sleep=time.sleep,
        clock=time.clock,
    )
    return Result(code, out.getvalue(), err.getvalue())


def with_old_model(*hosts: str, down: tuple[str, ...] = ()) -> tuple[FakeFleet, str]:
    fleet = FakeFleet(*hosts, down=down)
    old = ""
    for host in hosts:
        old = fleet[host].add("/m/old", "active")
    return fleet, old


# --- list ----------------------------------------------------------------------------------


def table_rows(out: str, host: str) -> dict[str, list[str]]:
    """The rows of one replica's table, by version."""
    lines = out.splitlines()
    start = lines.index(url(host)) + 2  # past the header
    rows = {}
    for line in lines[start:]:
        if not line.startswith("  ") or line.startswith("  *"):
            break
        cells = line.split(maxsplit=5)
        rows[cells[1]] = cells
    return rows


def test_list_shows_a_table_per_replica_with_the_default_name_marked() -> None:
    fleet, old = with_old_model("a", "b")
    new = fleet["a"].add(
        "/m/new",
        "ready",
        default=False,
        in_flight=3,
        rebaseline={"state": "running", "prompts_total": 10, "prompts_done": 3, "error": None},
    )
    bad = fleet["a"].add("/m/bad", "failed", error="no config.json in /m/bad")
    harm = fleet["a"].add("/m/harm", "active", name="harm", default=False)

    result = crs(fleet, "list", url("a"), url("b"))

    assert result.code == EXIT_OK, result.err
    rows = table_rows(result.out, "a")
    assert rows[old] == ["rm*", old, "active", "0", "-", "-"]
    assert rows[new] == ["rm*", new, "ready", "3", "running", "3/10  -"]
    assert rows[bad][2] == "failed"
    assert rows[bad][5] == "no config.json in /m/bad"
    assert rows[harm][:3] == ["harm", harm, "active"]
    assert list(table_rows(result.out, "b")) == [old]
    assert "* the default model name" in result.out


def test_list_json_is_each_replica_listing_as_served() -> None:
    fleet, old = with_old_model("a")

    result = crs(fleet, "list", url("a"), "--json")

    assert result.code == EXIT_OK
    document = json.loads(result.out)
    [replica] = document["replicas"]
    assert replica["url"] == url("a")
    assert replica["error"] is None
    assert [m["version"] for m in replica["models"]["models"]] == [old]
    assert replica["models"]["active_versions"] == {"rm": old}


def test_list_names_a_replica_that_refuses_connections_and_lists_the_others() -> None:
    fleet, old = with_old_model("a", "b", down=("b",))

    result = crs(fleet, "list", url("a"), url("b"))

    assert result.code == EXIT_FAILED
    assert old in result.out
    assert f"{url('b')}: cannot connect" in result.err


def test_list_without_the_api_token_says_which_token() -> None:
    fleet, _ = with_old_model("a")

    result = crs(fleet, "list", url("a"), env={})

    assert result.code == EXIT_FAILED
    assert "API token was refused (401" in result.err
    assert "CRS_API_TOKEN" in result.err


# --- load ----------------------------------------------------------------------------------


def test_load_activate_on_two_replicas_loads_both_then_activates_one_at_a_time() -> None:
    fleet, old = with_old_model("a", "b")
    fleet["a"].not_ready_after_change = 2
    fleet["b"].not_ready_after_change = 2
    new = version_of("/m/new")

    result = crs(fleet, "load", url("a"), url("b"), "--path", "/m/new", "--activate")

    assert result.code == EXIT_OK, result.err
    # Loaded everywhere first, and not activated by the load itself.
    assert fleet.calls("load") == [("a", "load", new, "-"), ("b", "load", new, "-")]
    assert fleet.index("b", "load", new, "-") < fleet.index("a", "activate", new)
    # b is activated only once a serves the new version and answers /readyz.
    a_activated = fleet.index("a", "activate", new)
    a_ready = fleet.log.index(("a", "ready"), a_activated)
    assert a_ready < fleet.index("b", "activate", new)
    b_ready = fleet.log.index(("b", "ready"), fleet.index("b", "activate", new))
    assert b_ready == len(fleet.log) - 1
    assert fleet["a"].active("rm") == new
    assert fleet["b"].active("rm") == new
    assert result.out.splitlines() == [
        f"{url('a')}: {new} active (previous: {old})",
        f"{url('b')}: {new} active (previous: {old})",
    ]


def test_load_activate_on_one_replica_lets_the_service_activate_and_shows_the_rebaseline() -> None:
    fleet, _ = with_old_model("a")
    new = version_of("/m/new")

    result = crs(fleet, "load", url("a"), "--path", "/m/new", "--activate")

    assert result.code == EXIT_OK, result.err
    assert fleet.calls("load") == [("a", "load", new, "activate")]
    assert fleet.calls("activate") == []
    assert fleet["a"].active("rm") == new
    assert f"{new} rebaseline running 0/4 prompts" in result.err
    assert f"{new} rebaseline done 4/4 prompts" in result.err
    assert result.out.strip() == f"{url('a')}: {new} active"


def test_load_without_activate_leaves_the_old_version_active_everywhere() -> None:
    fleet, old = with_old_model("a", "b")
    new = version_of("/m/new")

    result = crs(fleet, "load", url("a"), url("b"), "--path", "/m/new", "--rebaseline", "lazy")

    assert result.code == EXIT_OK, result.err
    assert [fleet[h].versions[new]["state"] for h in "ab"] == ["ready", "ready"]
    assert [fleet[h].active("rm") for h in "ab"] == [old, old]
    # a was ready before b was touched.
    assert fleet.log.index(("a", "ready")) < fleet.index("b", "load", new, "-")


def test_a_failed_load_exits_1_naming_the_replica_its_error_and_what_was_not_touched() -> None:
    fleet, old = with_old_model("a", "b", "c")
    fleet["b"].fail_load = "CUDA out of memory"
    new = version_of("/m/new")

    result = crs(fleet, "load", url("a"), url("b"), url("c"), "--path", "/m/new", "--activate")

    assert result.code == EXIT_FAILED
    assert f"{url('b')}: loading {new} failed: CUDA out of memory" in result.err
    assert f"done (loaded, not active): {url('a')}" in result.err
    assert f"failed: {url('b')}" in result.err
    assert f"not touched: {url('c')}" in result.err
    assert f"crs-service models unload {url('a')} {new}" in result.err
    assert ("c", "load", new, "-") not in fleet.log
    assert fleet.calls("activate") == []
    assert [fleet[h].active("rm") for h in "abc"] == [old, old, old]


def test_a_load_that_never_gets_ready_fails_at_the_timeout() -> None:
    fleet, _ = with_old_model("a", "b")
    fleet["a"].never_ready = True
    new = version_of("/m/new")

    result = crs(fleet, "load", url("a"), url("b"), "--path", "/m/new", "--timeout", "30")

    assert result.code == EXIT_FAILED
    assert f"{url('a')}: {new} is still loading after 30s (waiting for ready" in result.err
    assert f"not touched: {url('b')}" in result.err
    assert fleet.calls("load") == [("a", "load", new, "-")]


def test_a_load_refused_with_409_shows_the_server_message() -> None:
    fleet, old = with_old_model("a")
    fleet["a"].add("/m/new", "ready", default=False)

    result = crs(fleet, "load", url("a"), "--path", "/m/new")

    assert result.code == EXIT_FAILED
    assert f"409 conflict): {version_of('/m/new')} is already loaded" in result.err


# --- activate --------------------------------------------------------------------------------


def test_activate_stopped_by_a_409_says_how_to_roll_back_the_replicas_done() -> None:
    fleet, old = with_old_model("a", "b", "c")
    new = ""
    for host in "abc":
        new = fleet[host].add("/m/new", "ready", default=False)
    fleet["b"].busy = True

    result = crs(fleet, "activate", url("a"), url("b"), url("c"), new, "--rebaseline", "eager")

    assert result.code == EXIT_FAILED
    assert "another admin operation on rm is running" in result.err
    assert f"done ({new} active): {url('a')}" in result.err
    assert f"not touched: {url('c')}" in result.err
    assert f"to roll back: crs-service models activate {url('a')} {old}" in result.err
    assert fleet.calls("activate") == [("a", "activate", new)]


def test_activate_a_version_missing_on_a_replica_changes_nothing() -> None:
    fleet, _ = with_old_model("a", "b")
    new = fleet["a"].add("/m/new", "ready", default=False)

    result = crs(fleet, "activate", url("a"), url("b"), new)

    assert result.code == EXIT_FAILED
    assert f"{url('b')}: {new} is not loaded; load it first" in result.err
    assert "nothing was changed" in result.err
    assert fleet.calls("activate") == []


def test_activate_the_active_version_says_so() -> None:
    fleet, old = with_old_model("a")

    result = crs(fleet, "activate", url("a"), old)

    assert result.code == EXIT_OK, result.err
    assert result.out.strip() == f"{url('a')}: {old} was already active"


# --- unload ----------------------------------------------------------------------------------


def test_unload_goes_one_replica_at_a_time_until_each_is_gone_and_ready() -> None:
    fleet, old = with_old_model("a", "b")
    new = ""
    for host in "ab":
        new = fleet[host].add("/m/new", "ready", default=False)
        fleet[host].not_ready_after_change = 1

    result = crs(fleet, "unload", url("a"), url("b"), new)

    assert result.code == EXIT_OK, result.err
    assert all(new not in fleet[h].versions for h in "ab")
    assert fleet.calls("unload") == [("a", "unload", new), ("b", "unload", new)]
    a_unloaded = fleet.index("a", "unload", new)
    assert fleet.log.index(("a", "ready"), a_unloaded) < fleet.index("b", "unload", new)
    assert result.out.splitlines() == [f"{url(h)}: {new} unloaded" for h in "ab"]


def test_unload_of_an_active_version_changes_nothing() -> None:
    fleet, old = with_old_model("a", "b")

    result = crs(fleet, "unload", url("a"), url("b"), old)

    assert result.code == EXIT_FAILED
    assert f"{old} is active on {url('a')}, {url('b')}" in result.err
    assert fleet.calls("unload") == []


# --- tokens, admin plane, connections, usage -------------------------------------------------


@pytest.mark.parametrize(
    "how",
    [
        lambda: (["--admin-token", "wrong-token-123"], ENV),
        lambda: ([], {**ENV, "CRS_ADMIN_TOKEN": "wrong-token-123"}),
    ],
    ids=["flag", "environment"],
)
def test_a_wrong_admin_token_is_named_as_such_and_never_shown(
    how: Callable[[], tuple[list[str], dict[str, str]]],
) -> None:
    fleet, _ = with_old_model("a")
    flags, env = how()

    result = crs(fleet, "load", url("a"), "--path", "/m/new", *flags, env=env)

    assert result.code == EXIT_FAILED
    assert "admin token was refused (401" in result.err
    assert "--admin-token or $CRS_ADMIN_TOKEN" in result.err
    assert "wrong-token-123" not in result.err + result.out
    assert API_TOKEN not in result.err + result.out
    assert fleet.calls("load") == []


def test_no_admin_token_is_a_usage_error_before_any_request() -> None:
    fleet, old = with_old_model("a")

    result = crs(fleet, "activate", url("a"), old, env={"CRS_API_TOKEN": API_TOKEN})

    assert result.code == EXIT_USAGE
    assert "no admin token" in result.err
    assert fleet.log == []


@pytest.mark.parametrize("action", ["load", "activate", "unload"])
def test_a_404_on_admin_routes_says_the_admin_plane_is_off(action: str) -> None:
    fleet, old = with_old_model("a")
    fleet["a"].admin_plane = False
    new = fleet["a"].add("/m/new", "ready", default=False)
    argv = {
        "load": ["load", url("a"), "--path", "/m/other"],
        "activate": ["activate", url("a"), new],
        "unload": ["unload", url("a"), new],
    }[action]

    result = crs(fleet, *argv)

    assert result.code == EXIT_FAILED
    assert f"{url('a')}: the admin plane is off (404" in result.err
    assert "set CRS_ADMIN_TOKEN on the service" in result.err


def test_an_unreachable_replica_is_named_and_nothing_is_changed() -> None:
    fleet, _ = with_old_model("a", "b", down=("b",))

    result = crs(fleet, "load", url("a"), url("b"), "--path", "/m/new", "--activate")

    assert result.code == EXIT_FAILED
    assert f"{url('b')}: cannot connect ([Errno 111] Connection refused)" in result.err
    assert "nothing was changed" in result.err
    assert fleet.calls("load") == []


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["activate", "http://a:8000", "http://b:8000"], "give the VERSION"),
        (["unload", "http://a:8000", "http://a:8000", "rm@1"], "given twice"),
        (["list", "ftp://a"], "bad service URL"),
        (["load", "http://a:8000", "--path", "/m", "--timeout", "0"], "--timeout"),
    ],
)
def test_unusable_commands_exit_2(argv: list[str], message: str) -> None:
    fleet = FakeFleet("a", "b")

    result = crs(fleet, *argv)

    assert result.code == EXIT_USAGE
    assert message in result.err
    assert fleet.log == []
