"""The provider contract and the one place provider failures become Temporal errors."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta
from typing import Protocol

from temporalio.exceptions import ApplicationError

from keel import errors
from keel.types import LlmRequest, ProviderResult

__all__ = ["Provider", "ProviderResult", "error_body_message", "provider_error", "retry_after_seconds"]


class Provider(Protocol):
    name: str

    async def complete(self, req: LlmRequest, system: str) -> ProviderResult:
        """Answer `req`. `system` is the rendered system prompt; `req.messages` never holds it.

        Raise `provider_error(...)` (an ApplicationError) for any failure of the provider."""
        ...


def provider_error(
    provider: str,
    *,
    status: int | None,
    message: str,
    retry_after_s: float | None = None,
) -> ApplicationError:
    """Classify a provider failure. 429, 5xx, timeouts and connection errors (status None) are
    retryable, with the server's Retry-After honoured; 400/401/403/404/422 fail at once."""
    if status in (401, 403):
        return ApplicationError(
            f"{provider}: authentication failed ({status}): {message}. "
            f"Check the API key ({provider.upper()}_API_KEY) and that it may use this model.",
            type=errors.PROVIDER_AUTH_ERROR,
            non_retryable=True,
        )
    if status is not None and 400 <= status < 500 and status not in (408, 409, 429):
        return ApplicationError(
            f"{provider}: request rejected ({status}): {message}. "
            f"Check the model name and the request; retrying will not help.",
            type=errors.PROVIDER_BAD_REQUEST,
            non_retryable=True,
        )
    kind = "ProviderRateLimited" if status == 429 else "ProviderUnavailable"
    return ApplicationError(
        f"{provider}: {'rate limited' if status == 429 else 'unavailable'} "
        f"({status if status is not None else 'no response'}): {message}",
        type=kind,
        non_retryable=False,
        next_retry_delay=timedelta(seconds=retry_after_s) if retry_after_s else None,
    )


def error_body_message(body: object) -> str | None:
    """The message of a provider's JSON error body ({"error": {"message": ...}} or {"message": ...})."""
    if not isinstance(body, Mapping):
        return None
    err = body.get("error", body)
    msg = err.get("message") if isinstance(err, Mapping) else None
    return msg if isinstance(msg, str) and msg else None


def retry_after_seconds(headers: Mapping[str, str]) -> float | None:
    """Retry-After in its delta-seconds form (and OpenAI's retry-after-ms). An HTTP-date is rare from
    model APIs, and Temporal's backoff is a fine fallback."""
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        raw = headers.get(name)
        if raw is None:
            continue
        try:
            value = float(raw) * scale
        except ValueError:
            continue
        if 0 < value < 3600:
            return value
    return None
