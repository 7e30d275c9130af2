"""docs/verl.md's command against verl's own code: the verl wheel (``pip download --no-deps``)
composes the documented overrides with its own ``ppo_trainer.yaml`` (Hydra), loads the
adapter through its own ``get_custom_reward_fn`` / ``load_extern_object`` (``pkg://`` and file
path), and its default reward loop (``RewardLoopWorker`` with the ``naive`` manager) scores a
small ``DataProto`` batch against a real `crs-service serve`: the rewards are those of a plain
POST /v1/rewards, placed on each response's last valid token; with the baseline store killed,
they are ``on_unavailable`` and one warning per batch counts them.

verl's heavy dependencies that a reward function never reaches are not installed: ``ray`` is
a stub (its decorators pass through; nothing is scheduled). What the reward path runs is
real: ``tensordict``, ``omegaconf``, ``hydra-core`` (verl's pins, into a temporary folder with
``--no-deps``), and torch and transformers from the project's environment. verl runs in a
subprocess, so neither the stub nor its imports reach other tests.
"""

import json
import logging
import os
import re
import shlex
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fault_proxy import FaultProxy
from trainer_client import RewardClient
from trainer_client.launch import RedisProcess, ServiceProcess

VERL_VERSION = "0.9.1"
# What verl's reward path imports beyond torch and transformers, at verl 0.9.1's pins
# (tensordict <= 0.10.0, hydra-core 1.3 with its omegaconf and antlr runtime).
VERL_DEPS = [
    "tensordict==0.10.0",
    "pyvers>=0.2,<0.3",
    "omegaconf==2.3.0",
    "hydra-core==1.3.2",
    "antlr4-python3-runtime==4.9.3",
    "codetiming==1.4.0",
    "orjson",
]
NETWORK_ERRORS = re.compile(
    r"NewConnectionError|ConnectTimeout|ReadTimeout|Name or service not known|"
    r"Temporary failure in name resolution|Network is unreachable|ProxyError|ConnectionError"
)
REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "verl.md"
DOC_URLS = ("http://rm-0:8000", "http://rm-1:8000")
TOLERANCE = 1e-4

CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is the capital of France?"},
]
BASELINES: list[dict[str, Any]] = [
    {"prompt": "Write a haiku about rain.", "responses": ["Rain falls softly.", "Grey sky."]},
    {"prompt": CHAT, "responses": ["Paris.", "It is Paris.", "Lyon?"]},
    {"prompt": "Count to three.", "prompt_id": "count", "responses": ["1 2 3", "one two"]},
]
# (response, extra_info): what a dataset row and the policy give verl's reward loop.
CASES: list[tuple[str, dict[str, Any]]] = [
    ("Rain on the window", {"prompt": "Write a haiku about rain.", "index": 0}),
    ("Paris", {"prompt": CHAT, "index": 1}),
    ("1 2 3", {"prompt": "Count to three.", "prompt_id": "count", "index": 2}),
    ("Fine", {"prompt": "A prompt nobody sampled baselines for.", "index": 3}),
]


# --- verl's wheel and what its reward path imports -------------------------------------------


def pip(*args: str, cwd: Path) -> None:
    """Run pip; skip the module when the registry cannot be reached, fail on anything else."""
    done = subprocess.run(
        [sys.executable, "-m", "pip", *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )
    if done.returncode != 0:
        output = done.stdout + done.stderr
        if NETWORK_ERRORS.search(output):
            pytest.skip(
                f"the package registry is unreachable: pip {args[0]} failed ({output[-300:]})"
            )
        raise AssertionError(f"pip {' '.join(args)} failed:\n{output[-2000:]}")


@pytest.fixture(scope="module")
def verl_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A PYTHONPATH with verl's unpacked wheel and its reward path's dependencies."""
    root = tmp_path_factory.mktemp("verl")
    pip("download", "--no-deps", f"verl=={VERL_VERSION}", "-d", "wheel", cwd=root)
    [wheel] = (root / "wheel").glob("verl-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(root / "verl")
    pip("install", "--no-deps", "--target", "deps", *VERL_DEPS, cwd=root)
    return f"{root / 'deps'}:{root / 'verl'}:{REPO}"


# --- the documented command --------------------------------------------------------------------


def documented_overrides() -> list[str]:
    """The Hydra overrides of the ``main_ppo`` command in docs/verl.md, as a shell splits them."""
    for block in re.findall(r"```bash\n(.*?)```", DOC.read_text(), flags=re.DOTALL):
        if "verl.trainer.main_ppo" in block:
            words = shlex.split(block.replace("\\\n", " "), comments=True)
            after = words[words.index("verl.trainer.main_ppo") + 1 :]
            return [word for word in after if "=" in word]
    raise AssertionError("docs/verl.md has no main_ppo command")


def with_urls(overrides: list[str], first: str, second: str) -> list[str]:
    """The overrides with the page's two example replicas replaced by live ones."""
    return [o.replace(DOC_URLS[0], first).replace(DOC_URLS[1], second) for o in overrides]


def test_the_documented_overrides_name_verls_reward_keys() -> None:
    overrides = documented_overrides()
    keys = {override.split("=", 1)[0].lstrip("+") for override in overrides}
    assert "reward.custom_reward_function.path" in keys
    assert "reward.custom_reward_function.name" in keys
    assert not {key for key in keys if key.startswith("custom_reward_function.")}
    [url] = [o for o in overrides if ".reward_kwargs.url=" in o]
    # A bare comma is a Hydra sweep: the replicas must be a list.
    assert url.split("=", 1)[1] == f"[{DOC_URLS[0]},{DOC_URLS[1]}]"


# --- a service, and verl's reward loop in a subprocess ----------------------------------------


@pytest.fixture(scope="module")
def server(tiny_llama: Path) -> Iterator[ServiceProcess]:
    with ServiceProcess(tiny_llama) as running:
        running.wait_ready()
        with RewardClient(running.url) as client:
            assert client.push_baselines(BASELINES).stored == len(BASELINES)
        yield running


def direct(url: str, on_missing: str = "raw") -> list[dict[str, Any]]:
    """The results of one plain request for CASES, without any client."""
    items = [
        {"prompt": info["prompt"], "response": response}
        | ({"prompt_id": info["prompt_id"]} if "prompt_id" in info else {})
        for response, info in CASES
    ]
    body = {"items": items, "contrastive": {"on_missing": on_missing}}
    answer = httpx.post(f"{url}/v1/rewards", json=body, timeout=60)
    assert answer.status_code == 200, answer.text
    results: list[dict[str, Any]] = answer.json()["results"]
    return results


def run_verl(
    verl_path: str, tmp_path: Path, tokenizer: Path, overrides: list[str]
) -> dict[str, Any]:
    """verl's config and reward loop on CASES, in a subprocess (see ``main``)."""
    spec = {"tokenizer": str(tokenizer), "overrides": overrides, "cases": CASES}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    done = subprocess.run(
        [sys.executable, "-m", "tests.e2e.test_verl_peer", str(tmp_path)],
        cwd=REPO,
        env=verl_env(verl_path),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    answer: dict[str, Any] = json.loads((tmp_path / "answer.json").read_text())
    return answer


def verl_env(verl_path: str) -> dict[str, str]:
    """The subprocess's environment: verl's path; the URL and token only from the overrides."""
    env = {k: v for k, v in os.environ.items() if k not in ("CRS_URL", "CRS_API_TOKEN")}
    return env | {"PYTHONPATH": verl_path}


def file_path_form(overrides: list[str]) -> list[str]:
    """The overrides with the adapter given by its file, the other form verl takes."""
    import trainer_client.adapters.verl as adapter

    path = "reward.custom_reward_function.path="
    return [f"{path}{adapter.__file__}" if o.startswith(path) else o for o in overrides]


@pytest.mark.parametrize("form", ["pkg", "file"])
def test_verls_reward_loop_scores_with_the_documented_command(
    verl_path: str, server: ServiceProcess, tiny_llama: Path, tmp_path: Path, form: str
) -> None:
    # The second replica: a proxy to the same service, so that the list is seen to be one.
    with FaultProxy(server.url) as second:
        overrides = with_urls(documented_overrides(), server.url, second.url)
        if form == "file":
            overrides = file_path_form(overrides)
        answer = run_verl(verl_path, tmp_path, tiny_llama, overrides)
        assert second.paths("/v1/rewards")
    assert answer["decoded"] == [response for response, _ in CASES]
    expected = direct(server.url)
    assert [result["baseline_source"] for result in expected] == ["cache"] * 3 + ["missing"]
    scores = [output["reward_score"] for output in answer["outputs"]]
    contrastive = [result["contrastive"] for result in expected]
    assert scores == pytest.approx(contrastive, abs=TOLERANCE)
    extra = [output["reward_extra_info"] for output in answer["outputs"]]
    assert [info["raw_reward"] for info in extra] == pytest.approx(
        [result["reward"] for result in expected], abs=TOLERANCE
    )
    baselines = [info["baseline"] for info in extra]
    assert baselines[:3] == pytest.approx([r["baseline"] for r in expected[:3]], abs=TOLERANCE)
    assert baselines[3] != baselines[3]  # NaN: no baseline
    # verl puts each reward on the response's last valid token, zeros elsewhere.
    for row, (position, score) in enumerate(zip(answer["last"], scores, strict=True)):
        assert answer["rm_scores"][row][position] == pytest.approx(score, abs=1e-6)
        assert sum(map(abs, answer["rm_scores"][row])) == pytest.approx(abs(score), abs=1e-6)
    assert answer["warnings"] == []


@pytest.mark.parametrize("on_unavailable", ["default", "raw"])
def test_verls_reward_loop_during_a_store_outage(
    verl_path: str, tiny_llama: Path, tmp_path: Path, on_unavailable: str
) -> None:
    overrides = documented_overrides()
    if on_unavailable != "default":
        key = "+reward.custom_reward_function.reward_kwargs.on_unavailable="
        overrides = [o for o in overrides if not o.startswith(key)] + [key + on_unavailable]
    with (
        RedisProcess(tmp_path / "redis") as dying,
        ServiceProcess(tiny_llama, env={"CRS_REDIS_URL": dying.url}) as server,
    ):
        server.wait_ready()
        with RewardClient(server.url) as client:
            assert client.push_baselines(BASELINES).stored == len(BASELINES)
        dying.kill()
        with FaultProxy(server.url) as second:
            overrides = with_urls(overrides, server.url, second.url)
            answer = run_verl(verl_path, tmp_path, tiny_llama, overrides)
        expected = direct(server.url)
    assert [result["baseline_source"] for result in expected] == ["unavailable"] * len(CASES)
    scores = [output["reward_score"] for output in answer["outputs"]]
    raw = [result["reward"] for result in expected]
    # Default: 0.0, no better than the SFT baseline; never the raw reward silently.
    assert scores == pytest.approx([0.0] * len(CASES) if on_unavailable == "default" else raw)
    counted = [re.search(r"for (\d+) of (\d+) responses", line) for line in answer["warnings"]]
    assert all(counted), answer["warnings"]
    # One line per burst of concurrent calls (a batch), and every response counted once.
    assert sum(int(match[1]) for match in counted if match) == len(CASES)


# --- the verl side, run as `python -m tests.e2e.test_verl_peer FOLDER` ---------------------------


def _stub_ray() -> None:
    """A ``ray`` whose names are empty classes, or functions that pass decorated things
    through: verl imports it at module level, and its reward path schedules nothing."""
    import importlib.abc
    import importlib.machinery
    import types

    def anything(name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        if name[:1].isupper():
            return type(name, (), {})

        def passthrough(*args: Any, **kwargs: Any) -> Any:
            if len(args) == 1 and not kwargs and callable(args[0]):
                return args[0]
            return lambda decorated: decorated

        return passthrough

    class Stubs(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
            if name.split(".")[0] != "ray":
                return None
            return importlib.machinery.ModuleSpec(name, self, is_package=True)

        def create_module(self, spec: Any) -> types.ModuleType:
            module = types.ModuleType(spec.name)
            module.__path__ = []
            module.__getattr__ = anything  # type: ignore[method-assign]
            return module

        def exec_module(self, module: types.ModuleType) -> None:
            pass

    sys.meta_path.insert(0, Stubs())


def _batch(tokenizer: Any, cases: list[tuple[str, dict[str, Any]]]) -> Any:
    """A DataProto as verl's rollout leaves it: left-padded prompts, right-padded responses."""
    import numpy as np
    import torch
    from verl import DataProto

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    prompts = [tokenizer.encode(str(info["prompt"]), add_special_tokens=False) for _, info in cases]
    responses = [tokenizer.encode(text, add_special_tokens=False) for text, _ in cases]
    width_p, width_r = max(map(len, prompts)), max(map(len, responses)) + 2
    prompt_ids = torch.tensor([[pad] * (width_p - len(p)) + p for p in prompts])
    response_ids = torch.tensor([r + [pad] * (width_r - len(r)) for r in responses])
    prompt_mask = torch.tensor([[0] * (width_p - len(p)) + [1] * len(p) for p in prompts])
    response_mask = torch.tensor([[1] * len(r) + [0] * (width_r - len(r)) for r in responses])
    rows = len(cases)
    return DataProto.from_dict(
        tensors={
            "prompts": prompt_ids,
            "responses": response_ids,
            "input_ids": torch.cat([prompt_ids, response_ids], dim=1),
            "attention_mask": torch.cat([prompt_mask, response_mask], dim=1),
        },
        non_tensors={
            "data_source": np.array(["crs"] * rows, dtype=object),
            "reward_model": np.array([{"style": "model", "ground_truth": ""}] * rows),
            "extra_info": np.array([dict(info) for _, info in cases], dtype=object),
        },
    )


def main(folder: Path) -> None:
    """Compose verl's config with the overrides, build its reward loop worker and score."""
    _stub_ray()
    import importlib.resources

    from hydra import compose, initialize_config_dir
    from verl.experimental.reward_loop import RewardLoopWorker
    from verl.utils.ray_utils import get_event_loop

    spec = json.loads((folder / "spec.json").read_text())
    cases = [(text, info) for text, info in spec["cases"]]
    warnings: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: warnings.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("crs.adapters.verl").addHandler(handler)

    config_dir = importlib.resources.files("verl") / "trainer" / "config"
    tokenizer_override = f"actor_rollout_ref.model.path={spec['tokenizer']}"
    with initialize_config_dir(config_dir=str(config_dir), version_base=None):
        config = compose("ppo_trainer", overrides=[*spec["overrides"], tokenizer_override])
    worker = RewardLoopWorker(config)  # loads the reward function as main_ppo's workers do
    data = _batch(worker.input_tokenizer, cases)
    outputs = get_event_loop().run_until_complete(worker.compute_score_batch(data))
    scores = [output["reward_score"] for output in outputs]
    rm_scores = worker.reward_manager.assemble_rm_scores(data, scores)
    response_mask = data.batch["attention_mask"][:, data.batch["prompts"].size(1) :]
    decoded = [
        worker.input_tokenizer.decode(ids[: int(mask.sum())], skip_special_tokens=True)
        for ids, mask in zip(data.batch["responses"], response_mask, strict=True)
    ]
    get_event_loop().run_until_complete(_close_clients())
    answer = {
        "outputs": outputs,
        "rm_scores": rm_scores.tolist(),
        "last": [int(mask.sum()) - 1 for mask in response_mask],
        "decoded": decoded,
        "warnings": warnings,
    }
    (folder / "answer.json").write_text(json.dumps(answer, default=float))


async def _close_clients() -> None:
    from trainer_client.adapters.verl import aclose_clients

    await aclose_clients()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
