"""Versioned prompts: an agent's files `<name>.<version>.md` beside its module; version and content hash go
on every call."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from temporalio.exceptions import ApplicationError

from keel import errors


@dataclass(frozen=True)
class Prompt:
    name: str
    version: str
    text: str
    sha256: str

    @property
    def short_hash(self) -> str:
        return self.sha256[:12]


@cache
def load_prompt_at(directory: Path, name: str, version: str) -> Prompt:
    """`<directory>/<name>.<version>.md` (an agent's prompts live beside its module)."""
    path = directory / f"{name}.{version}.md"
    if not path.is_file():
        known = sorted(p.name for p in path.parent.glob("*.md")) if path.parent.is_dir() else []
        raise ApplicationError(
            f"prompt {name!r} version {version!r} not found at {path}; known: {known}",
            type=errors.PROMPT_NOT_FOUND,
            non_retryable=True,
        )
    text = path.read_text(encoding="utf-8").strip()
    return Prompt(name, version, text, hashlib.sha256(text.encode()).hexdigest())
