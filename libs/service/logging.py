"""structlog setup: JSON in services, console in the demo, secrets redacted by a processor."""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterable, MutableMapping
from typing import Any

import structlog

REDACTED = "[REDACTED]"

# Field names whose values are secret wherever they appear in an event, at any depth.
_SECRET_FIELD = re.compile(
    r"(pass(word)?|secret|access_token|request_token|api_key$|authorization|cookie|checksum|enctoken|jwt)",
    re.IGNORECASE,
)
# Values that look like credentials even under an innocent field name.
_SECRET_VALUE = (
    re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]+"),
    re.compile(r"(?i)(token\s+)[^\s:]+:[^\s,'\"]+"),
    re.compile(r"(?i)((?:access_token|api_secret|api_key|password|request_token|checksum)[\"']?\s*[=:]\s*[\"']?)[^\s&,'\"}]+"),
)
# Registered plaintext secrets. Token-shaped ones (Kite keys and tokens) sit in a
# set matched against the token-shaped runs of a string: one regex pass plus set
# look-ups, whatever the number of users. Others are checked by substring.
_TOKEN_RUN = re.compile(r"[A-Za-z0-9_.~+/=-]{6,}")
_token_secrets: dict[str, None] = {}
_other_secrets: dict[str, None] = {}
_KNOWN_SECRETS_MAX = 20_000


def register_secret(value: str | None) -> None:
    """Remember a plaintext secret so that it is scrubbed from any log line that quotes it."""
    if not value or len(value) < 6:
        return
    store = _token_secrets if _TOKEN_RUN.fullmatch(value) else _other_secrets
    if value in store:
        return
    if len(store) >= _KNOWN_SECRETS_MAX:
        store.pop(next(iter(store)))  # oldest first: dicts keep insertion order
    store[value] = None


def _scrub_token(match: re.Match[str]) -> str:
    run = match.group(0)
    if run in _token_secrets:
        return REDACTED
    # A secret glued to separators that the run pattern allows (e.g. "k:v" split
    # differently, or a trailing "="): fall back to a direct check of the run.
    for part in re.split(r"[/=+~.]", run):
        if part in _token_secrets:
            return run.replace(part, REDACTED)
    return run


def scrub(text: str) -> str:
    """Return text with credential-looking substrings and registered secrets replaced."""
    for pattern in _SECRET_VALUE:
        text = pattern.sub(lambda m: m.group(1) + REDACTED, text)
    if _token_secrets and len(text) >= 6:
        text = _TOKEN_RUN.sub(_scrub_token, text)
    for secret in _other_secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text


_MAX_DEPTH = 12


def _redact(value: Any, depth: int = 0) -> Any:
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if depth > _MAX_DEPTH:
        return "[TRUNCATED]"  # never hand an unscrubbed structure to the renderer
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, (bytes, bytearray)):
        return scrub(bytes(value).decode(errors="replace"))
    if isinstance(value, MutableMapping):
        return {
            k: (REDACTED if isinstance(k, str) and _SECRET_FIELD.search(k) else _redact(v, depth + 1))
            for k, v in value.items()
        }
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_redact(v, depth + 1) for v in value]
    # Exceptions, models, UUIDs, datetimes...: render as text here, so that what
    # the JSON renderer would otherwise repr() is scrubbed too.
    return scrub(str(value))


def redact_secrets(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: blank secret fields, scrub secret-looking values."""
    return _redact(event_dict)  # type: ignore[return-value]


def _pre_chain() -> list[Any]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]


def configure_logging(level: str = "INFO", fmt: str = "json", stream: Any = None,
                      quiet_loggers: Iterable[str] = ("urllib3", "autobahn", "twisted", "asyncio")) -> None:
    """Route structlog and stdlib logging through one redacting renderer."""
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=_pre_chain(),
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            redact_secrets,
            renderer,
        ],
    )
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in quiet_loggers:
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
    structlog.configure(
        # filter_by_level first: a disabled level (debug on a hot path) costs one check, not the chain.
        processors=[structlog.stdlib.filter_by_level, *_pre_chain(),
                    structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )


def get_logger(name: str | None = None, **bound: Any) -> Any:
    """Return a lazy structlog logger with fields bound.

    Lazy: the logger takes its configuration on first use, so a module-level
    logger made before `configure_logging` still logs through it.
    """
    return structlog.get_logger(name, **bound)
