"""What an approval binds to: a tool call's exact arguments, as a digest independent of key order.

(The deterministic checks of each call are an agent's own: `keel.Agent(validators=...)`.)
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any


def canonical_json(arguments: Mapping[str, Any]) -> str:
    return json.dumps(arguments, sort_keys=True, separators=(",", ":"), default=str)


def arguments_digest(arguments: Mapping[str, Any]) -> str:
    """What an approval binds to: the exact arguments, independent of key order."""
    return hashlib.sha256(canonical_json(arguments).encode()).hexdigest()

