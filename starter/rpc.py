"""Calls a command makes to Temporal, riding out a server that restarts: a call that fails for a transient
reason (unavailable, a deadline, a reset connection) is retried with backoff for up to
KEEL_TEMPORAL_WAIT_S, saying so on stderr (at most every few seconds however many calls wait); one that
fails for good is a `TemporalCallError` naming the call, the address and, for a timeout, the deadline
("Temporal: start of support_desk-TK-1 to 127.0.0.1:7233 timed out after 30 s"), never the bare
"Timeout expired"."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from temporalio.service import RPCError, RPCStatusCode

from keel.settings import KeelSettings

T = TypeVar("T")

TRANSIENT = frozenset({RPCStatusCode.UNAVAILABLE, RPCStatusCode.DEADLINE_EXCEEDED, RPCStatusCode.RESOURCE_EXHAUSTED,
                       RPCStatusCode.ABORTED, RPCStatusCode.UNKNOWN, RPCStatusCode.CANCELLED, RPCStatusCode.INTERNAL})
"""Statuses of a call worth making again: the server restarting, overloaded, or a connection cut."""

FIRST_DELAY_S, MAX_DELAY_S = 0.5, 5.0
SAY_EVERY_S = 5.0


class TemporalCallError(Exception):
    """A call to Temporal that failed for good (or for longer than the command waits), by name."""


def is_timeout(e: RPCError) -> bool:
    return e.status == RPCStatusCode.DEADLINE_EXCEEDED or "timeout expired" in e.message.lower()


class Temporal:
    """One command's calls to Temporal: their retries, deadline and what is said while they wait."""

    def __init__(self, settings: KeelSettings, say: Callable[[str], None] | None = None,
                 wait_s: float | None = None) -> None:
        self.address = settings.temporal_address
        self.timeout_s = settings.temporal_rpc_timeout_s
        self.wait_s = settings.temporal_wait_s if wait_s is None else wait_s
        self.say = say
        self._said_at = float("-inf")
        self.retries = 0

    def error(self, what: str, e: RPCError, waited_s: float) -> TemporalCallError:
        if is_timeout(e):
            text = f"Temporal: {what} to {self.address} timed out after {self.timeout_s:g} s"
        else:
            text = f"Temporal: {what} to {self.address} failed: {e.message}"
        if waited_s >= 1:
            text += f" (retried for {waited_s:.0f} s)"
        return TemporalCallError(text)

    def _notice(self, what: str, e: RPCError, waited_s: float) -> None:
        now = time.monotonic()
        if self.say is None or now - self._said_at < SAY_EVERY_S:
            return
        self._said_at = now
        self.say(f"Temporal at {self.address} is not answering ({what}: {e.message or e.status.name}); "
                 f"retrying, for up to {self.wait_s:g} s ({waited_s:.0f} s so far)")

    async def call(self, what: str, fn: Callable[[], Awaitable[T]]) -> T:
        """`fn()`, made again on a transient failure until it succeeds or KEEL_TEMPORAL_WAIT_S passed."""
        start, delay = time.monotonic(), FIRST_DELAY_S
        while True:
            try:
                return await fn()
            except RPCError as e:
                waited = time.monotonic() - start
                if e.status not in TRANSIENT or waited + delay > self.wait_s:
                    raise self.error(what, e, waited) from e
                self.retries += 1
                self._notice(what, e, waited)
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_DELAY_S)
