"""Versioned prompts: files `prompts/<name>.<version>.md`; version and content hash go on every call."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from temporalio.exceptions import ApplicationError

PROMPTS_DIR = Path(os.environ.get("KEEL_PROMPTS_DIR", Path(__file__).resolve().parents[1] / "prompts"))


@dataclass(frozen=True)
class Prompt:
    name: str
    version: str
    text: str
    sha256: str

    @property
    def short_hash(self) -> str:
        return self.sha256[:12]


def load_prompt(name: str, version: str) -> Prompt:
    """A built-in pipeline's prompt, under PROMPTS_DIR."""
    return load_prompt_at(PROMPTS_DIR, name, version)


@cache
def load_prompt_at(directory: Path, name: str, version: str) -> Prompt:
    """`<directory>/<name>.<version>.md` (an agent's prompts live beside its module)."""
    path = directory / f"{name}.{version}.md"
    if not path.is_file():
        known = sorted(p.name for p in path.parent.glob("*.md")) if path.parent.is_dir() else []
        raise ApplicationError(
            f"prompt {name!r} version {version!r} not found at {path}; known: {known}",
            type="PromptNotFound",
            non_retryable=True,
        )
    text = path.read_text(encoding="utf-8").strip()
    return Prompt(name, version, text, hashlib.sha256(text.encode()).hexdigest())
