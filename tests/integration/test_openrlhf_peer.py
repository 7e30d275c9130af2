"""OpenRLHF's own code calls crs: the module of OpenRLHF that calls a remote reward model
(``openrlhf/utils/agent.py``, ``SingleTurnAgentExecutor``: it decodes the prompt and generated
tokens with their special tokens and posts ``{"query", "prompts", "labels"}``, or calls a
``reward_func`` file) is taken from the published wheel at test time and run against a live
crs server, in both ``--remote_rm_url`` modes. The rewards it hands to PPO must be the service's.

Only the modules it imports that are not about the call are stubbed: ``openrlhf`` and
``openrlhf.utils`` (their ``__init__`` pulls in DeepSpeed and friends) and vLLM's engine (the
generation, replaced by fixed token ids). aiohttp, which makes the HTTP call, is real.
"""

from __future__ import annotations

import asyncio
import importlib.util
import subprocess
import sys
import types
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

import trainer_client.adapters.openrlhf as openrlhf_adapter
from tests.models import DirectScorer
from trainer_client.launch import RedisProcess, ServiceProcess

# The release whose agent.py is the caller (0.11 moved it there from utils/remote_rm_utils.py).
OPENRLHF = "openrlhf==0.11.2"
CALLER = "openrlhf/utils/agent.py"
LOGGING = "openrlhf/utils/logging_utils.py"
NETWORK_ERRORS = (
    "NewConnectionError",
    "Failed to establish a new connection",
    "Temporary failure in name resolution",
    "Name or service not known",
    "Network is unreachable",
    "ConnectTimeoutError",
    "ReadTimeoutError",
    "ProxyError",
)
TOLERANCE = 1e-5
END = "<|im_end|>"
QUESTION = "What is the capital of France?"
ANSWER = "Paris, on the Seine."
BASELINE = ["Paris.", "Lyon?", "It is Paris."]


def policy_prompt(question: str) -> str:
    """The policy's chat template (ChatML) with the generation prompt: what OpenRLHF's prompt
    dataset hands the executor."""
    return f"<|im_start|>user\n{question}{END}\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def wheel_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The caller's files, out of the wheel that ``pip download --no-deps`` fetches now."""
    where = tmp_path_factory.mktemp("openrlhf")
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(where)]
    done = subprocess.run([*command, OPENRLHF], capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        output = done.stdout + done.stderr
        if any(marker in output for marker in NETWORK_ERRORS):
            pytest.skip(f"the package registry cannot be reached: {output.strip()[-300:]}")
        raise AssertionError(f"pip download {OPENRLHF} failed:\n{output}")
    [wheel] = where.glob("openrlhf-*.whl")
    files: dict[str, Path] = {}
    with zipfile.ZipFile(wheel) as archive:
        for name in archive.namelist():
            # Platform wheels keep the package under openrlhf-<v>.data/purelib/.
            for wanted in (CALLER, LOGGING):
                if name == wanted or name.endswith(f"/purelib/{wanted}"):
                    files[wanted] = Path(archive.extract(name, where))
    assert set(files) == {CALLER, LOGGING}, f"{wheel.name} has no {CALLER}: the caller moved"
    return files


@pytest.fixture
def agent(wheel_files: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> Any:
    """OpenRLHF's agent module, loaded from the wheel with importlib."""
    for package in ("openrlhf", "openrlhf.utils"):
        stub = types.ModuleType(package)
        stub.__path__ = []
        monkeypatch.setitem(sys.modules, package, stub)
    monkeypatch.setitem(
        sys.modules, "openrlhf.utils.logging_utils", load(wheel_files[LOGGING], LOGGING)
    )
    return load(wheel_files[CALLER], CALLER)


def load(path: Path, name: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name.removesuffix(".py").replace("/", "."), path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def policy_tokenizer(tiny_llama: Path) -> Any:
    """A policy tokenizer whose template is ChatML: its end token is not the reward model's."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", END]})
    tokenizer.eos_token = END
    return tokenizer


@pytest.fixture(scope="module")
def served(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    """A server whose baselines for the prompt are pushed as docs/openrlhf.md says."""
    with (
        RedisProcess(tmp_path_factory.mktemp("redis-openrlhf")) as store,
        ServiceProcess(tiny_llama, env={"CRS_REDIS_URL": store.url}) as server,
    ):
        server.wait_ready()
        item = {"prompt": policy_prompt(QUESTION), "responses": BASELINE}
        pushed = httpx.put(f"{server.url}/v1/baselines", json={"items": [item]}, timeout=60)
        assert pushed.status_code == 200, pushed.text
        yield server


class Generated:
    """What vLLM's engine answers ``generate`` with, for fixed token ids."""

    def __init__(self, token_ids: list[int]) -> None:
        output = types.SimpleNamespace(token_ids=token_ids, finish_reason="stop", logprobs=None)
        self.outputs = [output]


class FixedEngine:
    """Stands in for OpenRLHF's vLLM engine: the policy "generates" the answer and its end."""

    def __init__(self, token_ids: list[int]) -> None:
        self.token_ids = token_ids

    async def generate(self, prompt_token_ids: list[int], params: Any, **_: Any) -> Generated:
        return Generated(self.token_ids)


def rollout(agent: Any, remote_rm_url: str, tokenizer: Any) -> dict[str, Any]:
    """One rollout through OpenRLHF's executor, reward call included."""
    executor = agent.SingleTurnAgentExecutor(remote_rm_url)
    answer_ids = tokenizer(ANSWER, add_special_tokens=False)["input_ids"]
    engine = FixedEngine([*answer_ids, tokenizer.convert_tokens_to_ids(END)])
    params = types.SimpleNamespace(max_tokens=32, logprobs=None)
    output: dict[str, Any] = asyncio.run(
        executor.execute(policy_prompt(QUESTION), "", params, 256, tokenizer, engine)
    )
    # OpenRLHF logs a failed reward call and goes on with None: that is a failure here.
    assert output["reward"] is not None, "OpenRLHF got no reward (see its log above)"
    return output


def service_answer(server: ServiceProcess, tokenizer: Any, output: dict[str, Any]) -> Any:
    """The service's own answer for the query OpenRLHF built."""
    query = tokenizer.decode(output["observation_tokens"], skip_special_tokens=False)
    assert query.endswith(END)
    body = {"query": [query], "prompts": [policy_prompt(QUESTION)]}
    response = httpx.post(f"{server.url}/get_reward", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def test_openrlhf_http_mode_gets_the_services_contrastive_rewards(
    agent: Any, served: ServiceProcess, policy_tokenizer: Any, tiny_llama: Path
) -> None:
    output = rollout(agent, f"{served.url}/get_reward", policy_tokenizer)
    expected = service_answer(served, policy_tokenizer, output)
    assert output["reward"] == pytest.approx(expected["rewards"], abs=TOLERANCE)
    assert output["scores"] == pytest.approx(expected["scores"], abs=TOLERANCE)
    logs = output["extra_logs"]
    # Contrastive, not the raw reward: the first call computes the rendered baseline.
    assert logs["baseline_cache"][0] + logs["baseline_computed"][0] == 1.0
    # And it is r - b with both terms rendered alike: the query as OpenRLHF decoded it, each
    # baseline response after the prompt with the policy's end token.
    query = policy_tokenizer.decode(output["observation_tokens"], skip_special_tokens=False)
    prompt = policy_prompt(QUESTION)
    baseline = np.mean([direct_reward(tiny_llama, prompt + r + END) for r in BASELINE])
    expected_reward = direct_reward(tiny_llama, query) - baseline
    assert output["reward"] == pytest.approx([expected_reward], abs=1e-4)


def direct_reward(model_dir: Path, text: str) -> float:
    """A plain forward of the text as it is (no special tokens added)."""
    import torch

    scorer = DirectScorer(model_dir)
    with torch.no_grad():
        batch = scorer.tokenizer(text, add_special_tokens=False, return_tensors="pt")
        return float(scorer.model(**batch).logits[0, 0])


def test_openrlhf_file_mode_gets_the_same_rewards(
    agent: Any, served: ServiceProcess, policy_tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CRS_URL", served.url)
    output = rollout(agent, openrlhf_adapter.__file__, policy_tokenizer)
    expected = service_answer(served, policy_tokenizer, output)
    assert output["reward"].tolist() == pytest.approx(expected["rewards"], abs=TOLERANCE)
    assert output["scores"].tolist() == pytest.approx(expected["scores"], abs=TOLERANCE)
    logs = output["extra_logs"]
    assert logs["baseline_cache"].tolist() + logs["baseline_computed"].tolist() in ([1, 0], [0, 1])


def test_the_file_adapter_with_the_store_down_gets_zero_and_warns(
    tiny_llama: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    prompt = policy_prompt(QUESTION)
    query = prompt + ANSWER + END
    with (
        RedisProcess(tmp_path / "redis") as dying,
        ServiceProcess(tiny_llama, env={"CRS_REDIS_URL": dying.url}) as server,
    ):
        server.wait_ready()
        item = {"prompt": prompt, "responses": BASELINE}
        assert httpx.put(f"{server.url}/v1/baselines", json={"items": [item]}).status_code == 200
        dying.kill()
        monkeypatch.setenv("CRS_URL", server.url)
        with caplog.at_level("WARNING", logger="crs.adapters.openrlhf"):
            answer = openrlhf_adapter.reward_func([query], [prompt], [""])
    assert answer["rewards"].tolist() == [0.0]  # the neutral contrastive reward
    assert answer["scores"].tolist() == pytest.approx([direct_reward(tiny_llama, query)], abs=1e-4)
    assert answer["extra_logs"]["baseline_unavailable"].tolist() == [1.0]
    assert any("unavailable for 1 of 1 queries" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("formatted", [False, True], ids=["plain-text", "starts-with-cls"])
def test_a_text_pair_model_gets_its_start_token_once(tiny_bert: Path, formatted: bool) -> None:
    """A query for a text-pair (encoder) model: special tokens are added unless the text
    already starts with the start token, which must then not come twice."""
    from transformers import AutoTokenizer

    from service.scoring.formatting import Formatter
    from service.scoring.types import RewardInput

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    text = "question answer"
    # Formatted: a template wrote the model's special tokens into the text itself.
    query = f"{tokenizer.cls_token} {text} {tokenizer.sep_token}" if formatted else text
    [encoded] = Formatter(tokenizer, "pair", 64).encode(
        [RewardInput(prompt="", response=query, text=query)], "none"
    )
    assert encoded.input_ids[0] == tokenizer.cls_token_id
    assert encoded.input_ids.count(tokenizer.cls_token_id) == 1
    assert encoded.input_ids == tokenizer(text)["input_ids"]
