"""A minimal client of OpenAI-compatible chat-completions endpoints (hosted models, vLLM, Ollama, LM Studio ...).

Standard library only (``urllib``): the caption pipeline must run wherever ``stmi`` is installed, and the protocol
is one JSON POST. What it adds to a bare POST is what a long captioning run needs:

- retries with exponential backoff on 429, 408, 5xx, timeouts and dropped connections, honouring ``Retry-After``;
- a reply validator run inside the retry loop, so a reply that is not the JSON asked for is retried like a
  transient error and, when it never comes right, surfaces as a :class:`ChatError` (never silently replaced);
- fatal errors (401, 403, 404: wrong key, wrong URL or model) stop the run at once instead of failing every request;
- the API key goes only into the ``Authorization`` header: every message this module produces is passed through
  :meth:`ChatClient.redact`, so an endpoint that echoes the key back does not leak it into logs or audit files.
"""

from __future__ import annotations

import email.utils
import json
import logging
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")

RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
FATAL_STATUS = frozenset({401, 403, 404})


class ChatError(RuntimeError):
    """A request that failed for good after its retries (the item is recorded as a failure)."""

    def __init__(self, message: str, attempts: int) -> None:
        super().__init__(message)
        self.attempts = attempts


class FatalChatError(RuntimeError):
    """An error no retry or other item can fix (bad key, wrong endpoint or model): the run stops."""


class _Retryable(Exception):
    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


def chat_url(endpoint: str) -> str:
    """The chat-completions URL of ``endpoint``.

    Accepts the base URL as OpenAI clients take it (``https://api.openai.com/v1``, ``http://localhost:8000/v1``)
    or the full ``.../chat/completions`` URL.
    """
    url = endpoint.rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"--endpoint {endpoint!r} must be an http(s) URL such as http://localhost:8000/v1")
    return url if url.endswith("/chat/completions") else url + "/chat/completions"


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date), None if absent or bad."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


def image_part(jpeg_b64: str) -> dict[str, Any]:
    """A user-message content part carrying a base64 JPEG as a data URL."""
    return {"type": "image_url", "image_url": {"url": f"data:image/jpeg;base64,{jpeg_b64}"}}


def reply_text(body: dict[str, Any]) -> str:
    """The assistant text of a chat-completions response (string content or a list of text parts)."""
    try:
        content = body["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise ValueError("response has no choices[0].message.content") from None
    if isinstance(content, list):
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    if not isinstance(content, str):
        raise ValueError("choices[0].message.content is not text")
    return content


@dataclass
class ChatClient:
    """Sends chat-completions requests with retries; thread-safe (one instance shared by the worker threads)."""

    endpoint: str
    model: str
    api_key: str | None = field(default=None, repr=False)
    timeout: float = 60.0
    """Seconds before one request is abandoned (and retried)."""
    max_retries: int = 4
    """Retries after the first attempt (so at most ``max_retries + 1`` requests per item)."""
    backoff: float = 1.0
    """First retry delay in seconds; doubled at each retry."""
    max_backoff: float = 60.0
    """Upper bound of any delay, ``Retry-After`` included."""
    temperature: float | None = 0.0
    """Sent when not None: 0 makes extraction as repeatable as the endpoint allows."""
    max_tokens: int = 1024
    requests_sent: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        self.url = chat_url(self.endpoint)

    def redact(self, text: str) -> str:
        """``text`` with the API key replaced by ``***``."""
        return text.replace(self.api_key, "***") if self.api_key else text

    def _post(self, payload: bytes) -> str:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.url, data=payload, headers=headers, method="POST")
        with self._lock:
            self.requests_sent += 1
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:  # noqa: S310 (the user's endpoint)
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            detail = self.redact(exc.read(300).decode("utf-8", "replace").strip().replace("\n", " "))
            reason = f"HTTP {exc.code} from {self.url}: {detail[:200]}"
            if exc.code in RETRY_STATUS or exc.code >= 500:
                raise _Retryable(reason, parse_retry_after(exc.headers.get("Retry-After"))) from None
            if exc.code in FATAL_STATUS:
                hint = {
                    401: "the API key was rejected: check the variable named by --api-key-env",
                    403: "the API key may not use this model or endpoint",
                    404: "check --endpoint (the base URL ending in /v1) and --model",
                }[exc.code]
                raise FatalChatError(f"{reason} ({hint})") from None
            raise ChatError(reason, 0) from None
        except (TimeoutError, socket.timeout) as exc:
            raise _Retryable(f"timeout after {self.timeout:g} s ({exc.__class__.__name__})") from None
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, (TimeoutError, socket.timeout)):
                raise _Retryable(f"timeout after {self.timeout:g} s") from None
            raise _Retryable(f"cannot reach {self.url}: {self.redact(str(exc.reason))}") from None
        except (ConnectionError, OSError) as exc:
            raise _Retryable(f"connection to {self.url} failed: {exc.__class__.__name__}") from None
        try:
            return reply_text(json.loads(raw))
        except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as exc:
            raise _Retryable(f"malformed chat-completions response from {self.url}: {exc}") from None

    def complete(self, content: list[dict[str, Any]] | str, validate: Callable[[str], T],
                 system: str | None = None) -> tuple[T, str, int]:
        """Send one user message and return the validated reply.

        Args:
            content: the user message (text, or a list of content parts such as :func:`image_part`).
            validate: turns the reply text into the caller's value; raising ``ValueError`` (e.g. ``ReplyError``)
                marks the reply as bad, which is retried like a transient error.
            system: optional system message.

        Returns:
            ``(value, reply text, attempts used)``.

        Raises:
            ChatError: still failing after ``max_retries`` retries; the message says why (last error).
            FatalChatError: 401/403/404, no point in retrying or continuing.
        """
        messages: list[dict[str, Any]] = []
        if system:
            messages.append({"role": "system", "content": system})
        messages.append({"role": "user", "content": content})
        body: dict[str, Any] = {"model": self.model, "messages": messages, "max_tokens": self.max_tokens}
        if self.temperature is not None:
            body["temperature"] = self.temperature
        payload = json.dumps(body).encode("utf-8")
        last = "no attempt made"
        for attempt in range(self.max_retries + 1):
            delay: float | None = None
            try:
                text = self._post(payload)
                try:
                    return validate(text), text, attempt + 1
                except ValueError as exc:
                    last = f"invalid reply: {self.redact(str(exc))}"
            except _Retryable as exc:
                last = str(exc)
                delay = exc.retry_after
            except ChatError as exc:
                raise ChatError(str(exc), attempt + 1) from None
            if attempt == self.max_retries:
                break
            wait = delay if delay is not None else self.backoff * (2**attempt)
            wait = min(wait, self.max_backoff)
            log.debug("attempt %d failed (%s); retrying in %.2f s", attempt + 1, last, wait)
            time.sleep(wait)
        raise ChatError(f"{last} (after {self.max_retries + 1} attempts)", self.max_retries + 1)
