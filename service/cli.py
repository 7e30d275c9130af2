"""`crs-service`: run the reward service and build tiny models for tests and demos."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pydantic import ValidationError

from service.scoring.tiny import TINY_ARCHS

log = logging.getLogger("crs.cli")

# Command-line flags of `serve` and the settings field each one sets.
SERVE_FLAGS: dict[str, str] = {
    "name": "model_name",
    "host": "host",
    "port": "port",
    "device": "device",
    "dtype": "dtype",
    "input_format": "input_format",
    "label_index": "label_index",
    "max_input_tokens": "max_input_tokens",
    "max_batch_tokens": "max_batch_tokens",
    "device_workers": "device_workers",
    "redis_url": "redis_url",
    "truncation": "truncation",
    "trust_remote_code": "trust_remote_code",
    "allow_pickle_weights": "allow_pickle_weights",
    "log_level": "log_level",
    "keep_previous": "keep_previous",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="crs-service", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_serve(commands.add_parser("serve", help="serve a reward model over HTTP"))
    tiny = commands.add_parser("tiny-model", help="build a small random reward model")
    tiny.add_argument("dir", type=Path, help="output directory (must be empty or absent)")
    tiny.add_argument("--arch", choices=TINY_ARCHS, default="llama")
    tiny.add_argument("--seed", type=int, default=0)
    add_models(commands.add_parser("models", help="list, load, activate or unload model versions"))
    return parser


def add_models(models: argparse.ArgumentParser) -> None:
    """`crs-service models ACTION URL...`, run by service/admin_cli.py. The tokens come from the
    environment when the command runs, not as argparse defaults, so --help never shows them."""
    actions = models.add_subparsers(dest="models_action", required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="each replica's model versions and their state")
    listing.add_argument("--json", action="store_true", help="the listings as JSON")
    load = actions.add_parser("load", help="load a model directory, one replica at a time")
    activate = actions.add_parser("activate", help="make a loaded version its name's active one")
    unload = actions.add_parser("unload", help="unload a version that is not active")
    for action in (listing, load, activate, unload):
        action.add_argument(
            "urls", nargs="+", metavar="URL", help="replica base URLs, changed in this order"
        )
        action.add_argument("--token", help="API token for GET /v1/models ($CRS_API_TOKEN)")
    for action in (activate, unload):
        action.add_argument("version", metavar="VERSION", help="e.g. rm@1a2b3c4d")
    load.add_argument("--path", required=True, help="model directory, as the service sees it")
    load.add_argument("--name", help="name it serves under (default: the default model's)")
    load.add_argument(
        "--activate", action="store_true", help="activate it once loaded on every replica"
    )
    load.add_argument(
        "--golden", help="JSONL of {prompt, response, reward} on the service's disk to check"
    )
    load.add_argument("--golden-tolerance", type=float, help="largest golden difference")
    for action in (load, activate):
        action.add_argument(
            "--rebaseline", choices=["eager", "lazy"], help="rescore baselines before (eager)"
        )
    for action in (load, activate, unload):
        action.add_argument("--admin-token", help="the service's admin token ($CRS_ADMIN_TOKEN)")
        action.add_argument(
            "--timeout", type=float, default=1800.0, help="seconds to wait per replica"
        )
        action.add_argument(
            "--poll-interval", type=float, default=1.0, help="seconds between progress looks"
        )
        action.add_argument("--quiet", action="store_true", help="no progress on stderr")


def add_serve(serve: argparse.ArgumentParser) -> None:
    """Flags default to None so that CRS_* environment settings apply unless a flag is given."""
    serve.add_argument(
        "--model",
        action="append",
        metavar="[NAME=]DIR",
        help="reward model directory (CRS_MODEL_PATH); repeat as NAME=DIR to serve several "
        "named models (CRS_MODELS), the first being the default",
    )
    serve.add_argument("--name", help="model name in its version (default: directory name)")
    serve.add_argument("--host", help="bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default 8000)")
    serve.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    serve.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"])
    serve.add_argument("--input-format", choices=["auto", "chat", "pair"])
    serve.add_argument("--label-index", type=int, help="reward logit when num_labels > 1")
    serve.add_argument("--max-input-tokens", type=int)
    serve.add_argument("--max-batch-tokens", type=int)
    serve.add_argument(
        "--device-workers", type=int, help="forward threads (default 1 on CUDA, 2 on a CPU)"
    )
    serve.add_argument("--truncation", choices=["none", "left"])
    serve.add_argument(
        "--redis-url",
        help="baseline store, e.g. redis://host:6379/0, or a Redis Cluster: "
        "redis+cluster://host1:6379,host2:6379 (default: in-process)",
    )
    serve.add_argument("--trust-remote-code", action="store_true", default=None)
    serve.add_argument("--allow-pickle-weights", action="store_true", default=None)
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    serve.add_argument("--access-log", action="store_true", help="log every request")
    serve.add_argument(
        "--keep-previous",
        action="store_true",
        default=None,
        help="after a swap keep the previous version loaded as the rollback target",
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of `crs-service`."""
    args = build_parser().parse_args(argv)
    if args.command == "tiny-model":
        return tiny_model(args)
    if args.command == "models":
        return models(args)
    return serve(args)


def models(args: argparse.Namespace) -> int:
    """The admin client needs httpx (the client extra), which a server-only install lacks."""
    try:
        from service.admin_cli import run_models
    except ModuleNotFoundError as exc:
        if exc.name != "httpx":
            raise
        return fail("crs-service models needs httpx: pip install httpx (the client extra)")
    return run_models(args)


def model_flags(values: list[str]) -> dict[str, object]:
    """``--model DIR`` (one model) or ``--model NAME=DIR`` repeated (several), as settings."""
    if len(values) == 1 and "=" not in values[0]:
        return {"model_path": Path(values[0])}
    return {"models": values} if values else {}


def tiny_model(args: argparse.Namespace) -> int:
    from service.scoring.tiny import build_tiny_model

    try:
        out = build_tiny_model(args.dir, args.arch, seed=args.seed)
    except ValueError as exc:
        return fail(str(exc))
    print(f"wrote a tiny {args.arch} reward model to {out}")
    return 0


def fail(message: str) -> int:
    print(f"crs-service: error: {message}", file=sys.stderr)
    return 2


def settings_errors(error: ValidationError) -> str:
    """Each refused setting by its variable name and why, never its value: a refused value can
    be a secret (a token, a URL with a password)."""
    reasons = []
    for item in error.errors(include_input=False, include_url=False):
        message = str(item["msg"]).removeprefix("Value error, ")
        if item["loc"]:
            message = f"CRS_{str(item['loc'][0]).upper()}: {message}"
        reasons.append(message)
    return "; ".join(reasons)


def serve(args: argparse.Namespace) -> int:
    """Check the model directory, then run uvicorn until SIGTERM/SIGINT, draining gracefully."""
    from service.settings import Settings

    overrides = {field: getattr(args, flag) for flag, field in SERVE_FLAGS.items()}
    overrides.update(model_flags(args.model or []))
    try:
        settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        return fail(f"invalid settings: {settings_errors(exc)}")
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    specs = settings.model_specs()
    if any(path is None for _, path in specs):
        return fail("no model: pass --model DIR or set CRS_MODEL_PATH")
    from service.scoring.model import preflight
    from service.scoring.types import ModelLoadError

    for _, path in specs:
        assert path is not None
        try:
            preflight(path, settings)
        except ModelLoadError as exc:
            return fail(str(exc))
    from service.server import run_server

    return run_server(settings, access_log=args.access_log)
