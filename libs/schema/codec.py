"""Encode and decode JSON canonically with orjson.

`dumps` sorts keys, so two equal objects always serialise to the same bytes.
The scheduler relies on that: the JSON of an event is its member in the
`schedule` ZSET, and removing or deduplicating a member needs the exact bytes.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import orjson
from pydantic import BaseModel

__all__ = ["dumps", "loads"]

# OPT_UTC_Z writes UTC as "Z", the same as pydantic's JSON mode, so a datetime
# serialises identically whether it arrives bare or inside a model.
_OPTIONS = orjson.OPT_SORT_KEYS | orjson.OPT_UTC_Z | orjson.OPT_NON_STR_KEYS


def _default(obj: Any) -> Any:
    if isinstance(obj, BaseModel):
        return obj.model_dump(mode="json")
    if isinstance(obj, Decimal):
        # A string keeps the exact value and matches pydantic's JSON mode.
        return str(obj)
    if isinstance(obj, (set, frozenset)):
        # Sorted so that set iteration order cannot break canonical output.
        return sorted(obj, key=repr)
    raise TypeError(f"cannot serialise {type(obj).__name__} to JSON")


def dumps(obj: Any) -> bytes:
    """Return canonical JSON bytes (sorted keys) for obj.

    Handles pydantic models (JSON mode), UUID, date, datetime, time, Decimal,
    enums and sets besides the plain JSON types.
    """
    return orjson.dumps(obj, default=_default, option=_OPTIONS)


def loads(data: bytes | bytearray | memoryview | str) -> Any:
    """Parse JSON bytes or text into Python objects."""
    return orjson.loads(data)
