"""Memory of a crs-service process across hot swaps: does an unloaded version give its memory back?

One real ``crs-service serve`` process (admin plane on) starts on model A. Each cycle then loads
the other of two directories (B, A, B, ...) with ``POST /admin/models {"activate": true,
"rebaseline": "lazy"}``, waits until the new version is active and the previous one is unloaded
(gone from ``GET /v1/models`` and its engine stopped: the service logs "model version V unloaded"
once its memory is released), scores one request on the new version, and samples the server's
memory: VmRSS (RssAnon, RssFile) of the process and its children from /proc and, on CUDA, the
bytes torch's allocator holds (``crs_device_memory_bytes{kind="allocated"|"reserved"}`` on
``/metrics``). A version whose weights stay referenced makes RSS (or CUDA memory) climb by a
model per cycle; a service that gives memory back stays level after the first swap.

B is A's files (symbolic links) plus a marker file, so B is another version (another digest)
whose load reads the same weights again: every cycle really loads one copy and unloads another,
without building and storing the model twice. The random-weight llamas are saved in bf16; on a
CPU the service loads them as float32, so each load makes a copy of its own.

It prints the path of a JSON report and one summary line; it never asserts anything
(tests/e2e/test_swap_memory.py asserts on its report).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import re
import struct
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
from throughput import SHAPES, build_shaped_model, machine_info

from trainer_client.launch import ServiceProcess

log = logging.getLogger("bench.swap_memory")

BENCH_DIR = Path(__file__).resolve().parent
# A llama whose weights (103 MB in float32, most of it the embedding table) dwarf its compute,
# so a CPU can swap it 20 times in well under a minute and one leaked copy is over 10% of RSS.
MID_SHAPE = {
    "hidden_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "intermediate_size": 1024,
}
MODEL_SHAPES: dict[str, dict[str, Any]] = {"llama-100m": MID_SHAPE, **SHAPES}
DEFAULT_SHAPE = {"cpu": "llama-100m", "cuda": "llama-1b"}
# The full-size warm-up batch of every load is this many tokens (CRS_MAX_BATCH_TOKENS).
DEFAULT_BATCH_TOKENS = {"cpu": 1024, "cuda": 65536}
MODEL_NAME = "rm"
ADMIN_TOKEN = "swap-memory-bench-admin"
SCORED = {
    "items": [{"prompt": "How are you today?", "response": "Fine, thank you for asking."}],
    "contrastive": None,
}
POLL_S = 0.05
SAFETENSORS_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "U8": 1}


# --- command line -----------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/swap_memory.py",
        description="Server memory (RSS, CUDA) over load/activate/unload cycles of crs-service.",
    )
    parser.add_argument(
        "--model", type=Path, help="model A's directory (default: build one of --shape)"
    )
    parser.add_argument(
        "--shape",
        choices=sorted(MODEL_SHAPES),
        help="random-weight llama to build when --model is absent "
        "(default llama-100m on a CPU, llama-1b on CUDA)",
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--cycles", type=int, default=20, help="swaps to run (default 20)")
    parser.add_argument(
        "--max-batch-tokens",
        type=int,
        help="CRS_MAX_BATCH_TOKENS: each load's warm-up runs a batch of this many tokens "
        "(default 1024 on a CPU, 65536 on CUDA)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--timeout", type=float, default=600.0, help="seconds any one step may take"
    )
    parser.add_argument("--out", type=Path, help="the report's path (default: in --out-dir)")
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=BENCH_DIR / "results",
        help="where the report goes when --out is absent, as swap-memory-<machine>.json, the "
        "machine being cpu-<n>core or the CUDA card, e.g. nvidia-h200 (default bench/results)",
    )
    parser.add_argument("--plot", action="store_true", help="also write a PNG next to --out")
    args = parser.parse_args(argv)
    if args.cycles < 1:
        parser.error("--cycles must be at least 1")
    if args.model is not None and args.shape is not None:
        parser.error("--shape builds a model; it cannot be combined with --model")
    args.shape = None if args.model else (args.shape or DEFAULT_SHAPE[args.device])
    args.max_batch_tokens = args.max_batch_tokens or DEFAULT_BATCH_TOKENS[args.device]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per poll
    args = parse_args(argv)
    machine = machine_info(args.device)
    with tempfile.TemporaryDirectory(prefix="crs-swap-memory-") as tmp:
        model_a = args.model or build_model(Path(tmp) / "rm-a", args.shape, args.device, args.seed)
        model_b = twin(model_a, Path(tmp) / "rm-b")
        model = model_description(model_a, args.shape)
        with serving(model_a, args) as server:
            samples = run_cycles(server, (model_a, model_b), args)
    report = build_report(args, machine, model, samples)
    out = args.out or args.out_dir / f"swap-memory-{machine['name']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    if args.plot:
        write_plot(report, out.with_suffix(".png"))
    print(out)
    print(report["summary"])
    return 0


# --- models -----------------------------------------------------------------------------------


def build_model(out_dir: Path, shape: str, device: str, seed: int) -> Path:
    """A llama of ``shape`` with random bf16 weights and the tiny llama's tokenizer, saved like
    any checkpoint (built on ``device``: an 8B model made on a CPU would take minutes)."""
    from service.scoring.tiny import build_tiny_model

    log.info("building a random-weight %s reward model", shape)
    tokenizer_dir = build_tiny_model(out_dir.parent / "tiny-llama", "llama", seed=seed)
    return build_shaped_model(out_dir, shape, tokenizer_dir, device, seed, shapes=MODEL_SHAPES)


def twin(model: Path, out_dir: Path) -> Path:
    """Another version of ``model``: links to its files and a marker file (hashed into the
    version digest, read by nothing else)."""
    out_dir.mkdir(parents=True)
    for file in model.iterdir():
        if file.is_file():
            (out_dir / file.name).symlink_to(file.resolve())
    (out_dir / "swap-twin.txt").write_text("the same weights under another version\n")
    return out_dir


def model_description(model: Path, shape: str | None) -> dict[str, Any]:
    """Parameters and bytes of the weights, read from the safetensors headers."""
    parameters = 0
    weight_bytes = 0
    dtypes: set[str] = set()
    for file in sorted(model.glob("*.safetensors")):
        with file.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        for name, tensor in header.items():
            if name == "__metadata__":
                continue
            count = 1
            for size in tensor["shape"]:
                count *= size
            parameters += count
            weight_bytes += count * SAFETENSORS_BYTES.get(tensor["dtype"], 4)
            dtypes.add(tensor["dtype"])
    return {
        "shape": shape,
        "path": None if shape else str(model),
        "parameters": parameters,
        "saved_dtype": "/".join(sorted(dtypes)),
        "saved_bytes": weight_bytes,
        "float32_bytes": parameters * 4,
    }


# --- the server and its memory ----------------------------------------------------------------


@contextlib.contextmanager
def serving(model: Path, args: argparse.Namespace) -> Iterator[ServiceProcess]:
    flags = ["--device", args.device, "--max-batch-tokens", str(args.max_batch_tokens)]
    # Info level: the registry's "unloaded" line is how the bench knows memory was released.
    flags += ["--log-level", "info", "--name", MODEL_NAME]
    # No linger after a swap: nothing else calls this service, and the cycle waits for the unload.
    env = {"CRS_ADMIN_TOKEN": ADMIN_TOKEN, "CRS_DRAIN_IDLE_S": "0"}
    with ServiceProcess(model, args=flags, env=env) as server:
        server.wait_ready(args.timeout)
        yield server


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants, from the parent ids in /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            # The command name (field 2) may hold spaces; the parent id follows its ")".
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, []))
    return tree


def resident_bytes(pid: int) -> dict[str, int]:
    """VmRSS, RssAnon and RssFile of ``pid`` and its children together, in bytes."""
    wanted = {"VmRSS": "rss_bytes", "RssAnon": "rss_anon_bytes", "RssFile": "rss_file_bytes"}
    total = dict.fromkeys(wanted.values(), 0)
    for member in process_tree(pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{member}/status").read_text().splitlines():
                field, _, value = line.partition(":")
                if field in wanted:
                    total[wanted[field]] += int(value.split()[0]) * 1024
    return total


DEVICE_MEMORY = re.compile(r'^crs_device_memory_bytes\{kind="(\w+)"\} (\S+)$', re.MULTILINE)


def device_memory(client: httpx.Client) -> dict[str, int | None]:
    """CUDA bytes allocated and reserved, from /metrics (absent when the service is on a CPU)."""
    found = {kind: int(float(value)) for kind, value in DEVICE_MEMORY.findall(get_text(client))}
    return {
        "cuda_allocated_bytes": found.get("allocated"),
        "cuda_reserved_bytes": found.get("reserved"),
    }


def get_text(client: httpx.Client) -> str:
    response = client.get("/metrics")
    response.raise_for_status()
    return response.text


# --- cycles -----------------------------------------------------------------------------------


def run_cycles(
    server: ServiceProcess, models: tuple[Path, Path], args: argparse.Namespace
) -> list[dict[str, Any]]:
    """The sample after start (cycle 0), then one per swap, alternating B and A."""
    assert server.process is not None
    pid = server.process.pid
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    with httpx.Client(base_url=server.url, timeout=args.timeout) as client:
        version = active_version(client)
        samples = [sample(client, pid, 0, models[0], version, None, 0.0)]
        for cycle in range(1, args.cycles + 1):
            path = models[cycle % 2]
            started = time.perf_counter()
            new, old = swap(client, server, path, admin, args.timeout)
            seconds = time.perf_counter() - started
            samples.append(sample(client, pid, cycle, path, new, old, seconds))
            log.info(
                "cycle %d: %s active, RSS %.0f MiB",
                cycle,
                new,
                samples[-1]["rss_bytes"] / 2**20,
            )
    return samples


def swap(
    client: httpx.Client,
    server: ServiceProcess,
    path: Path,
    admin: dict[str, str],
    timeout_s: float,
) -> tuple[str, str]:
    """Load ``path`` and activate it; return once the previous version's engine is stopped."""
    previous = active_version(client)
    # A and B come back every other cycle: count this version's unloads, not just look for one.
    unloaded = f"model version {previous} unloaded"
    unloads = server_log(server).count(unloaded)
    answer = client.post(
        "/admin/models",
        json={"path": str(path), "activate": True, "rebaseline": "lazy"},
        headers=admin,
    )
    if answer.status_code != 202:
        raise RuntimeError(f"load of {path} answered {answer.status_code}: {answer.text}")
    version: str = answer.json()["version"]
    wait_until(lambda: loaded_state(client, version) == "active", timeout_s, f"{version} active")
    wait_until(lambda: loaded_state(client, previous) is None, timeout_s, f"{previous} unloaded")
    # Gone from the listing comes before the engine has stopped and released its memory.
    wait_until(
        lambda: server_log(server).count(unloaded) > unloads, timeout_s, f"log line {unloaded!r}"
    )
    return version, previous


def loaded_state(client: httpx.Client, version: str) -> str | None:
    """The state of ``version`` in ``GET /v1/models`` (None once it is not listed); a failed
    load raises with its error."""
    response = client.get("/v1/models")
    response.raise_for_status()
    for entry in response.json()["models"]:
        if entry["version"] == version:
            if entry["state"] == "failed":
                raise RuntimeError(f"load of {version} failed: {entry['error']}")
            state: str = entry["state"]
            return state
    return None


def active_version(client: httpx.Client) -> str:
    response = client.get("/v1/models")
    response.raise_for_status()
    version: str = response.json()["active_versions"][MODEL_NAME]
    return version


def server_log(server: ServiceProcess) -> str:
    return server.log_path.read_text(errors="replace")


def wait_until(done: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} after {timeout_s} s")
        time.sleep(POLL_S)


def sample(
    client: httpx.Client,
    pid: int,
    cycle: int,
    path: Path,
    version: str,
    previous: str | None,
    swap_s: float,
) -> dict[str, Any]:
    """Score one request on the active version, then read the server's memory."""
    scored = client.post("/v1/rewards", json=SCORED)
    scored.raise_for_status()
    served = scored.json()["model"]["version"]
    if served != version:
        raise RuntimeError(f"cycle {cycle}: scored by {served}, expected {version}")
    return {
        "cycle": cycle,
        "loaded": path.name,
        "version": version,
        "unloaded": previous,
        "swap_s": round(swap_s, 3),
        **resident_bytes(pid),
        **device_memory(client),
    }


# --- report -----------------------------------------------------------------------------------


def build_report(
    args: argparse.Namespace,
    machine: dict[str, Any],
    model: dict[str, Any],
    samples: list[dict[str, Any]],
) -> dict[str, Any]:
    """Per-cycle memory and the last cycle's memory over the first's (cycle 1: the first swap,
    which also pays for what one-time first use of the swap path allocates)."""
    first, last = samples[1], samples[-1]
    ratios = {
        key.removesuffix("_bytes"): ratio(last[key], first[key])
        for key in ("rss_bytes", "rss_anon_bytes", "cuda_allocated_bytes", "cuda_reserved_bytes")
    }
    report = {
        "benchmark": "swap_memory",
        "machine": machine,
        "model": model,
        "settings": {
            "cycles": args.cycles,
            "device": args.device,
            "max_batch_tokens": args.max_batch_tokens,
            "rebaseline": "lazy",
        },
        "cycles": samples,
        "last_over_first": ratios,
        "rss_growth_bytes": last["rss_bytes"] - first["rss_bytes"],
        "rss_after_start_bytes": samples[0]["rss_bytes"],
    }
    report["summary"] = summary_line(report)
    return report


def ratio(last: int | None, first: int | None) -> float | None:
    if last is None or first is None or first == 0:
        return None
    return round(last / first, 4)


def mib(value: int) -> str:
    return f"{value / 2**20:.0f} MiB"


def summary_line(report: dict[str, Any]) -> str:
    """``20 swaps of llama-100m (26M params) on cpu-2core: RSS 612 MiB after the first, ...``"""
    model, cycles = report["model"], report["cycles"]
    first, last = cycles[1], cycles[-1]
    ratios = report["last_over_first"]
    what = model["shape"] or model["path"]
    text = (
        f"{len(cycles) - 1} swaps of {what} ({model['parameters'] / 1e6:.0f}M params) on "
        f"{report['machine']['name']}: RSS {mib(first['rss_bytes'])} after the first, "
        f"{mib(last['rss_bytes'])} after the last ({ratios['rss']}x)"
    )
    if last["cuda_allocated_bytes"] is not None:
        text += (
            f"; CUDA allocated {mib(first['cuda_allocated_bytes'])} -> "
            f"{mib(last['cuda_allocated_bytes'])} ({ratios['cuda_allocated']}x), reserved "
            f"{mib(first['cuda_reserved_bytes'])} -> {mib(last['cuda_reserved_bytes'])} "
            f"({ratios['cuda_reserved']}x)"
        )
    return text


def write_plot(report: dict[str, Any], path: Path) -> None:
    """Memory per cycle as a PNG, when matplotlib is installed (it is not a dependency)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return
    cycles = report["cycles"]
    x = [sample["cycle"] for sample in cycles]
    figure, axes = plt.subplots(figsize=(7.0, 4.0))
    series = [("RSS", "rss_bytes"), ("RSS anonymous", "rss_anon_bytes")]
    series += [("CUDA allocated", "cuda_allocated_bytes"), ("CUDA reserved", "cuda_reserved_bytes")]
    for label, key in series:
        if cycles[-1][key] is not None:
            axes.plot(x, [sample[key] / 2**20 for sample in cycles], marker="o", label=label)
    axes.set_xlabel("swap (0: after start)")
    axes.set_ylabel("MiB")
    axes.set_title(report["summary"].split(":")[0])
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


if __name__ == "__main__":
    raise SystemExit(main())
