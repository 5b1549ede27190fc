"""Shadow mode's activities. PLACEHOLDER: filled in by issue #6 work."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import Engine


class ShadowActivities:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def all(self) -> list[Callable[..., Any]]:
        return []
