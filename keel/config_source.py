"""The settings that hold a table (KEEL_PRICES, KEEL_TENANT_BUDGETS...): inline JSON starting with `{`, or
the path of a .json or .toml file. One reader, so each such setting fails the same clear way."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any


class ConfigSourceError(ValueError):
    """The setting cannot be read: the message names it (and its file)."""


def read_table(setting: str, text: str) -> tuple[Any, str]:
    """(the parsed value, where it came from: for messages). `text` is the setting's stripped value."""
    if text.startswith("{"):
        where = f"{setting} (inline JSON)"
        try:
            return json.loads(text), where
        except json.JSONDecodeError as e:
            raise ConfigSourceError(f"{where}: not valid JSON: {e}") from None
    path = Path(text).expanduser()
    where = f"{setting} file {path}"
    try:
        body = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigSourceError(f"{where}: no such file ({setting} is the path of a .json or .toml file, or "
                                "inline JSON)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigSourceError(f"{where}: cannot read it: {e}") from None
    toml = path.suffix.lower() == ".toml"
    try:
        return (tomllib.loads(body) if toml else json.loads(body)), where
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        raise ConfigSourceError(f"{where}: not valid {'TOML' if toml else 'JSON'}: {e}") from None
