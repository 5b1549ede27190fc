"""The sim model's answers for the 'dr/*' prompts. PLACEHOLDER: filled in by issue #6 work."""

from __future__ import annotations

import random

from core.types import LlmRequest, ToolCall


def respond(req: LlmRequest, rng: random.Random) -> tuple[str, list[ToolCall]]:
    raise NotImplementedError
