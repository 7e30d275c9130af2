"""The JSONL files of offline baselines: prompt files in, baseline files out.

A prompt file has one ``{"prompt": ..., "prompt_id": optional}`` object per line; a baseline
file (what ``sample-baselines`` writes and ``push-baselines`` reads, the source of truth of
DESIGN.md 5) has one ``{"prompt_id", "prompt", "responses": [...]}`` per line. Lines are checked
here, before any GPU time or upload is spent, with errors that name the file and line.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer_client.prompt_id import prompt_id

# The roles the service accepts (its ChatMessage schema): checking them here refuses a bad
# prompt file before hours of sampling rather than at upload.
ROLES = frozenset({"system", "user", "assistant", "tool"})

PromptValue = str | list[dict[str, str]]


class RecordError(ValueError):
    """A line of a prompt or baseline file that cannot be used; the message names the line."""


@dataclass(frozen=True, kw_only=True)
class PromptLine:
    """One prompt of a prompt file."""

    line: int
    prompt: PromptValue
    prompt_id: str


@dataclass(frozen=True, kw_only=True)
class BaselineRecord:
    """One prompt of a baseline file with its sampled responses."""

    line: int
    prompt: PromptValue
    prompt_id: str
    responses: list[str]

    def to_json(self) -> dict[str, Any]:
        """The line as written to a baseline file (also the item of ``PUT /v1/baselines``)."""
        return {"prompt_id": self.prompt_id, "prompt": self.prompt, "responses": self.responses}


def read_prompt_file(path: Path) -> list[PromptLine]:
    """Every prompt of a prompt file, checked; blank lines are skipped.

    Raises:
        RecordError: for the first unusable line, naming it.
        OSError: if the file cannot be read.
    """
    prompts: list[PromptLine] = []
    for line_number, obj in _json_lines(path):
        where = f"{path}:{line_number}"
        prompt = parse_prompt(obj.get("prompt"), where)
        given = _optional_id(obj.get("prompt_id"), where)
        prompts.append(
            PromptLine(line=line_number, prompt=prompt, prompt_id=prompt_id(prompt, given))
        )
    return prompts


def iter_baseline_file(path: Path) -> Iterator[BaselineRecord]:
    """The records of a baseline file one at a time (a file of millions stays out of memory).

    A record without ``prompt_id`` gets the derived one, as the service would compute it.

    Raises:
        RecordError: at the first unusable line, naming it.
    """
    for line_number, obj in _json_lines(path):
        where = f"{path}:{line_number}"
        prompt = parse_prompt(obj.get("prompt"), where)
        given = _optional_id(obj.get("prompt_id"), where)
        yield BaselineRecord(
            line=line_number,
            prompt=prompt,
            prompt_id=prompt_id(prompt, given),
            responses=_responses(obj.get("responses"), where),
        )


def parse_prompt(value: object, where: str) -> PromptValue:
    """A prompt as the API takes it: a non-empty string or a non-empty list of messages."""
    if isinstance(value, str):
        if not value:
            raise RecordError(f"{where}: 'prompt' is an empty string")
        return value
    if isinstance(value, list) and value:
        return [
            _message(message, f"{where}: prompt message {i}") for i, message in enumerate(value)
        ]
    raise RecordError(
        f"{where}: 'prompt' must be a non-empty string or a non-empty list of "
        f"{{'role', 'content'}} messages, got {_describe(value)}"
    )


def _message(value: object, where: str) -> dict[str, str]:
    if not isinstance(value, dict) or set(value) != {"role", "content"}:
        raise RecordError(f"{where}: must be an object with exactly 'role' and 'content'")
    role, content = value["role"], value["content"]
    if role not in ROLES:
        raise RecordError(f"{where}: role must be one of {sorted(ROLES)}, got {role!r}")
    if not isinstance(content, str):
        raise RecordError(f"{where}: 'content' must be a string, got {_describe(content)}")
    return {"role": role, "content": content}


def _optional_id(value: object, where: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise RecordError(f"{where}: 'prompt_id' must be a non-empty string, got {value!r}")
    return value


def _responses(value: object, where: str) -> list[str]:
    if not isinstance(value, list) or not value:
        raise RecordError(f"{where}: 'responses' must be a non-empty list of strings")
    if not all(isinstance(response, str) for response in value):
        raise RecordError(f"{where}: every response must be a string")
    return list(value)


def _json_lines(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line; 1-based numbers, as editors show."""
    # Bytes, decoded line by line, so that bad UTF-8 is reported with its line too.
    with path.open("rb") as lines:
        for line_number, raw in enumerate(lines, start=1):
            if not raw.strip():
                continue
            where = f"{path}:{line_number}"
            try:
                obj = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                raise RecordError(f"{where}: not valid UTF-8") from None
            except json.JSONDecodeError as error:
                raise RecordError(f"{where}: not valid JSON ({error.msg})") from None
            if not isinstance(obj, dict):
                raise RecordError(f"{where}: expected a JSON object, got {_describe(obj)}")
            yield line_number, obj


def _describe(value: object) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."
