"""Deterministic Kite order tags: one per order intent of one strategy run.

The entry (BUY) and the exit (SELL, STOPLOSS, square-off) each get one tag, so
two exits can never both reach the broker, and after an ambiguous failure the
executor can look the tag up in the broker's order book before placing again.
"""

from __future__ import annotations

import base64
import functools
import hashlib
from datetime import date
from typing import Literal
from uuid import UUID

TAG_LENGTH = 20
OrderIntent = Literal["entry", "exit"]
_INTENT_CODE = {"entry": "E", "exit": "X"}


@functools.lru_cache(maxsize=65_536)  # asked several times per order; a SHA-256 each time shows in profiles
def order_tag(strategy_id: UUID | str, run_id: str, trading_day: date, intent: OrderIntent) -> str:
    """Return the 20-character tag for this strategy run's entry or exit order."""
    digest = hashlib.sha256(f"{strategy_id}|{run_id}|{trading_day.isoformat()}".encode()).digest()
    body = base64.b32encode(digest).decode()[: TAG_LENGTH - 3]
    return f"TW{_INTENT_CODE[intent]}{body}"


def intent_of(event_type: str) -> OrderIntent:
    """Return which order an event places: BUY enters, everything else exits."""
    return "entry" if event_type == "BUY" else "exit"


def intent_of_tag(tag: str) -> OrderIntent:
    """Return the intent a tag of `order_tag` was made for."""
    return "entry" if tag[2:3] == _INTENT_CODE["entry"] else "exit"
