"""Real provider traffic as fixtures: every HTTP exchange of the openai/anthropic providers recorded to a
file (KEEL_RECORD), and served back from it without a network (KEEL_REPLAY).

Recorded under the SDKs, at the HTTP level: a replay runs the real SDK parsing, the provider code and the
LLM activity's repairs exactly as live traffic does. An exchange is keyed by `request_key`: the sha256 of
the method, the URL path (not the host or port: a recording made against one server replays anywhere) and
the JSON body with sorted keys. Headers (keys, SDK versions, retry counts) are not part of the key.

A recording is a JSON Lines file, one exchange a line, in call order: key, provider, model, method, path,
base_url, request (the parsed JSON body), status, headers (those a provider reads), response (the parsed
JSON body), recorded_at. A retried identical request adds no line; a key answered differently later keeps
its first answer (counted, and logged). Transient failures (408, 409, 429, 5xx) are not recorded: they
would replay forever, and the retry that follows is what the run used. Recording into an existing file
adds only what it lacks.

In a replay, a request whose key the recording lacks fails the model call, not retried
(`errors.RECORDING_MISSING`), with its key, provider:model, path, the file, the last message and how the
closest recorded request differs.

To record: `KEEL_RECORD=tests/recordings/NAME.jsonl` in the worker's environment (`keel up`, `keel worker`,
`python -m workers`), or `keel.testing.agent_environment(..., record=PATH)`; run keyed tasks (`--key`, business
ids) on a fresh database, so that what tools return does not depend on earlier runs. To replay:
`KEEL_REPLAY=PATH`, or `agent_environment(..., replay=PATH)`, with the same tasks (inputs, models, prompts).
"""

from __future__ import annotations

import base64
import hashlib
import importlib
import json
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

from temporalio.exceptions import ApplicationError

from keel import errors

log = logging.getLogger("keel.recording")

KEPT_HEADERS = ("content-type", "retry-after", "retry-after-ms", "x-request-id", "request-id")
"""Response headers a recording keeps: the ones the providers read."""
REPLAY_API_KEY = "keel-replay"
"""The API key a replaying provider uses when none is configured (nothing is sent anywhere)."""
EXCERPT_CHARS = 120


def is_transient(status: int) -> bool:
    return status in (408, 409, 429) or status >= 500


# --- the key ------------------------------------------------------------------------------------------


def _parse(body: bytes) -> tuple[bool, Any]:
    try:
        return True, json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return False, None


def canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def canonical_request(method: str, path: str, body: bytes) -> bytes:
    """What the key hashes: `METHOD path`, a newline, the body (sorted-key compact JSON, or its bytes when
    it is not JSON)."""
    is_json, parsed = _parse(body)
    return f"{method.upper()} {path}\n".encode() + (canonical_json(parsed) if is_json else body)


def request_key(method: str, path: str, body: bytes) -> str:
    return hashlib.sha256(canonical_request(method, path, body)).hexdigest()


def _path_of(request: Any) -> str:
    """The URL's path and query, without scheme, host or port."""
    raw = request.url.raw_path
    return raw.decode("ascii") if isinstance(raw, bytes) else str(raw)


# --- one exchange -------------------------------------------------------------------------------------


@dataclass
class Exchange:
    key: str
    provider: str
    model: str
    method: str
    path: str
    base_url: str
    request: Any
    request_is_json: bool
    status: int
    headers: dict[str, str]
    response: Any
    response_is_json: bool
    recorded_at: str = ""

    def to_line(self) -> str:
        row: dict[str, Any] = {"key": self.key, "provider": self.provider, "model": self.model,
                               "method": self.method, "path": self.path, "base_url": self.base_url}
        row["request" if self.request_is_json else "request_b64"] = self.request
        row |= {"status": self.status, "headers": self.headers}
        row["response" if self.response_is_json else "response_b64"] = self.response
        row["recorded_at"] = self.recorded_at
        return json.dumps(row, ensure_ascii=False)

    @classmethod
    def from_line(cls, line: str) -> Exchange:
        row = json.loads(line)
        if not isinstance(row, dict):
            raise ValueError("not a JSON object")
        return cls(key=str(row["key"]), provider=str(row.get("provider", "")), model=str(row.get("model", "")),
                   method=str(row["method"]), path=str(row["path"]), base_url=str(row.get("base_url", "")),
                   request=row["request"] if "request" in row else row["request_b64"],
                   request_is_json="request" in row, status=int(row["status"]),
                   headers={str(k): str(v) for k, v in (row.get("headers") or {}).items()},
                   response=row["response"] if "response" in row else row["response_b64"],
                   response_is_json="response" in row, recorded_at=str(row.get("recorded_at", "")))

    @property
    def response_bytes(self) -> bytes:
        return canonical_json(self.response) if self.response_is_json else base64.b64decode(self.response)

    @property
    def answer_digest(self) -> str:
        return hashlib.sha256(f"{self.status}\n".encode() + self.response_bytes).hexdigest()


def _exchange(provider: str, base_url: str, method: str, path: str, body: bytes, status: int,
              headers: Any, content: bytes) -> Exchange:
    req_json, req = _parse(body)
    resp_json, resp = _parse(content)
    model = req.get("model", "") if req_json and isinstance(req, dict) else ""
    return Exchange(
        key=request_key(method, path, body), provider=provider, model=str(model), method=method, path=path,
        base_url=base_url, request=req if req_json else base64.b64encode(body).decode(), request_is_json=req_json,
        status=status, headers={h: headers[h] for h in KEPT_HEADERS if h in headers},
        response=resp if resp_json else base64.b64encode(content).decode(), response_is_json=resp_json,
        recorded_at=datetime.now(UTC).isoformat(timespec="seconds"))


# --- recording ----------------------------------------------------------------------------------------


class RecordingFileError(errors.KeelError, ValueError):
    """A recording file that cannot be read (not found, or a line that is not an exchange)."""


def read_recording(path: Path) -> Iterator[Exchange]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise RecordingFileError(f"recording {path}: cannot read it: {e}") from e
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield Exchange.from_line(line)
        except (ValueError, KeyError, TypeError) as e:
            raise RecordingFileError(f"recording {path}, line {n}: not a recorded exchange ({e!r})") from e


@dataclass
class Recorder:
    """Appends each new exchange to `path` as it happens (a run cut short keeps what it recorded)."""

    path: Path
    added: int = 0
    duplicates: int = 0
    """Requests answered again the same way (a retried call): no new line."""
    conflicts: int = 0
    """Requests recorded before and answered differently now: the first answer is kept."""
    transient: int = 0
    """Transient failures (408, 409, 429, 5xx) seen and not recorded."""
    _answers: dict[str, str] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        if self.path.exists():
            self._answers = {ex.key: ex.answer_digest for ex in read_recording(self.path)}
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def add(self, ex: Exchange) -> None:
        if is_transient(ex.status):
            self.transient += 1
            return
        with self._lock:
            known = self._answers.get(ex.key)
            if known is not None:
                if known == ex.answer_digest:
                    self.duplicates += 1
                else:
                    self.conflicts += 1
                    log.warning("recording %s: %s request %s answered differently than when first recorded; "
                                "the first answer is kept", self.path, ex.provider, ex.key)
                return
            with self.path.open("a", encoding="utf-8") as f:
                f.write(ex.to_line() + "\n")
            self._answers[ex.key] = ex.answer_digest
            self.added += 1


# --- replay -------------------------------------------------------------------------------------------


class RecordingMissing(errors.KeelError, LookupError):
    """A replayed request the recording has no answer for. Raised in the HTTP transport; the provider
    turns it into a non-retryable `errors.RECORDING_MISSING` failure."""

    def application_error(self) -> ApplicationError:
        return ApplicationError(str(self), type=errors.RECORDING_MISSING, non_retryable=True)


@dataclass
class Recording:
    path: Path
    exchanges: dict[str, Exchange]

    @classmethod
    def load(cls, path: Path) -> Recording:
        exchanges: dict[str, Exchange] = {}
        for ex in read_recording(path):
            exchanges.setdefault(ex.key, ex)
        return cls(path, exchanges)

    def base_url(self, provider: str) -> str | None:
        """The base URL the provider's requests were recorded against: replaying with it makes the
        provider build the same requests (e.g. OpenAI's own API and compatible servers differ)."""
        return next((ex.base_url for ex in self.exchanges.values() if ex.provider == provider and ex.base_url),
                    None)

    def missing(self, provider: str, method: str, path: str, body: bytes) -> RecordingMissing:
        key = request_key(method, path, body)
        is_json, req = _parse(body)
        model = req.get("model", "?") if is_json and isinstance(req, dict) else "?"
        lines = [f"no recorded answer for this {provider} request: key {key} ({provider}:{model}, {method} {path}) "
                 f"in recording {self.path} ({len(self.exchanges)} exchanges)."]
        if is_json:
            lines.append(f"Its last message: {last_message(req)}.")
            closest = self._closest(path, req)
            if closest is not None:
                where = _difference(closest.request, req)
                lines.append(f"Closest recorded request ({closest.key[:16]}...) differs at {where}.")
        lines.append(f"The request changed since it was recorded (a prompt, tool, input or model, or something that "
                     f"varies between runs): record it again with KEEL_RECORD={self.path} (adds the missing "
                     f"exchanges), or make what varies deterministic.")
        return RecordingMissing(" ".join(lines))

    def _closest(self, path: str, req: Any) -> Exchange | None:
        def score(ex: Exchange) -> tuple[int, int, int]:
            a, b = ex.request, req
            same_model = int(isinstance(a, dict) and isinstance(b, dict) and a.get("model") == b.get("model"))
            ma = a.get("messages", []) if isinstance(a, dict) else []
            mb = b.get("messages", []) if isinstance(b, dict) else []
            common = 0
            for x, y in zip(ma, mb, strict=False):
                if x != y:
                    break
                common += 1
            same_rest = sum(1 for k in set(a) | set(b) if a.get(k) == b.get(k)) if isinstance(a, dict) and isinstance(
                b, dict) else 0
            return same_model, common, same_rest

        candidates = [ex for ex in self.exchanges.values() if ex.path == path and ex.request_is_json]
        return max(candidates, key=score, default=None)


def _excerpt(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return repr(text if len(text) <= EXCERPT_CHARS else text[:EXCERPT_CHARS] + "...")


def last_message(req: Any) -> str:
    """`role: content` of the request's last message (OpenAI or Anthropic shapes), cut short."""
    messages = req.get("messages") if isinstance(req, dict) else None
    if not isinstance(messages, list) or not messages:
        return "(none)"
    m = messages[-1]
    if not isinstance(m, dict):
        return _excerpt(m)
    content = m.get("content")
    if isinstance(content, list):  # Anthropic blocks
        parts = [b.get("text") or b.get("content") or b if isinstance(b, dict) else b for b in content]
        content = " ".join(p if isinstance(p, str) else json.dumps(p, ensure_ascii=False) for p in parts)
    if not content and m.get("tool_calls"):
        content = m["tool_calls"]
    return f"{m.get('role', '?')}: {_excerpt(content or '')}"


def _difference(recorded: Any, now: Any, where: str = "") -> str:
    """Where two requests first differ (messages first), with both values cut short."""
    if isinstance(recorded, dict) and isinstance(now, dict):
        keys = sorted(set(recorded) | set(now), key=lambda k: (k != "messages", k))
        for k in keys:
            if recorded.get(k, _ABSENT) != now.get(k, _ABSENT):
                return _difference(recorded.get(k, _ABSENT), now.get(k, _ABSENT), f"{where}.{k}" if where else k)
    elif isinstance(recorded, list) and isinstance(now, list):
        for i, (a, b) in enumerate(zip(recorded, now, strict=False)):
            if a != b:
                return _difference(a, b, f"{where}[{i}]")
        return f"{where}: {len(recorded)} items recorded, {len(now)} now"
    shown = {id(_ABSENT): "(absent)"}
    return (f"{where or 'the body'}: recorded {shown.get(id(recorded)) or _excerpt(recorded)}, "
            f"now {shown.get(id(now)) or _excerpt(now)}")


_ABSENT: Any = object()


def missing_error(exc: BaseException) -> ApplicationError | None:
    """The non-retryable failure of a provider call whose SDK error was caused by a request missing from
    the recording (SDKs that wrap any transport error as a connection error), else None."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, RecordingMissing):
            return seen.application_error()
        seen = seen.__cause__ or seen.__context__
    return None


# --- the transports -----------------------------------------------------------------------------------


def http_module(sdk_http_client: type) -> ModuleType:
    """The HTTP library under an SDK (`httpx`, or `httpx2` in recent openai/anthropic releases): the
    transports answer with its own Response type."""
    base = next(c for c in sdk_http_client.__mro__ if c.__name__ == "AsyncClient")
    return importlib.import_module(base.__module__.split(".")[0])


class _Transport:
    def __init__(self, http: ModuleType, provider: str, base_url: str) -> None:
        self.http, self.provider, self.base_url = http, provider, base_url

    async def __aenter__(self) -> _Transport:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        pass


class RecordingTransport(_Transport):
    """Forwards to the real transport, then records the exchange."""

    def __init__(self, http: ModuleType, provider: str, base_url: str, recorder: Recorder, inner: Any) -> None:
        super().__init__(http, provider, base_url)
        self.recorder, self.inner = recorder, inner

    async def handle_async_request(self, request: Any) -> Any:
        body = await request.aread()
        response = await self.inner.handle_async_request(request)
        content = await response.aread()  # decoded; kept on the response for the SDK to read
        self.recorder.add(_exchange(self.provider, self.base_url, request.method, _path_of(request), body,
                                    response.status_code, response.headers, content))
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


class ReplayTransport(_Transport):
    """Answers from the recording; never opens a socket."""

    def __init__(self, http: ModuleType, provider: str, base_url: str, recording: Recording) -> None:
        super().__init__(http, provider, base_url)
        self.recording = recording

    async def handle_async_request(self, request: Any) -> Any:
        body = await request.aread()
        path = _path_of(request)
        ex = self.recording.exchanges.get(request_key(request.method, path, body))
        if ex is None:
            raise self.recording.missing(self.provider, request.method, path, body)
        headers = {"content-type": "application/json", **ex.headers}
        return self.http.Response(ex.status, headers=headers, content=ex.response_bytes, request=request)


@dataclass
class Traffic:
    """A worker's recording or replay of the real providers' traffic (one of the two)."""

    recorder: Recorder | None = None
    recording: Recording | None = None

    @property
    def api_key(self) -> str | None:
        return REPLAY_API_KEY if self.recording is not None else None

    def base_url(self, provider: str, configured: str) -> str:
        recorded = self.recording.base_url(provider) if self.recording is not None else None
        return recorded or configured

    def client_options(self, provider: str, configured: str, sdk_http_client: type) -> dict[str, Any]:
        """What a provider's SDK client is built with to record or replay: the SDK's own HTTP client on the
        transport that does it, and, for a replay, the base URL the requests were recorded against."""
        base_url = self.base_url(provider, configured)
        return {"base_url": base_url, "http_client": self.http_client(provider, base_url, sdk_http_client)}

    def http_client(self, provider: str, base_url: str, sdk_http_client: type) -> Any:
        """The SDK's own HTTP client class (e.g. `openai.DefaultAsyncHttpxClient`), on a recording or
        replaying transport."""
        http = http_module(sdk_http_client)
        transport: _Transport
        if self.recording is not None:
            transport = ReplayTransport(http, provider, base_url, self.recording)
        else:
            assert self.recorder is not None
            transport = RecordingTransport(http, provider, base_url, self.recorder, http.AsyncHTTPTransport())
        return sdk_http_client(transport=transport)

    @classmethod
    def from_settings(cls, record: Path | None, replay: Path | None) -> Traffic | None:
        if replay is not None:
            traffic = cls(recording=Recording.load(replay))
            log.info("replaying openai/anthropic traffic from %s (%d exchanges): no network", replay.resolve(),
                     len(traffic.recording.exchanges) if traffic.recording else 0)
            return traffic
        if record is not None:
            log.info("recording openai/anthropic traffic to %s", record.resolve())
            return cls(recorder=Recorder(record))
        return None
