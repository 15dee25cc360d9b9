"""Keep the paper broker's state in one file: accounts, tokens, orders, trades, positions, funds, prices.

The codec is generic: any dataclass defined in a simulator module is
written field by field (`dataclasses.fields`), with its type name and an id,
so a field added later is saved without touching this module, and a field
missing from an older file takes its default. Shared objects (an order is in
its account, in the book's index and maybe in a resting-order index) are
written once and referred to by id after, so they come back as one object.
Instruments are written as their token and resolved against the market.

A book attribute that cannot be stored (a list of callbacks, say) is left out
with a warning rather than failing the whole write.

Writes are atomic (temp file, fsync, rename) and private (0600: the file
holds the api secrets of paper accounts). A change is noticed from any
mutating request (`mark_dirty`) or, once a second, from a cheap fingerprint
of the book (order state transitions, which also cover fills on ticks); it is
written after a short debounce that grows with the time one write takes, so
a large book never holds the event loop for long. Shutdown writes once more.
A `kill -9` loses at most the last debounce window.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib
import itertools
import os
import pkgutil
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

import orjson
import structlog

from services import kite_sim
from services.kite_sim.book import Book
from services.kite_sim.market import Instrument, Market
from services.kite_sim.portfolio import Portfolio

log = structlog.get_logger("kite_sim.store")

FORMAT_VERSION = 1
MIN_DEBOUNCE_S = 0.2
FINGERPRINT_PERIOD_S = 1.0
WRITE_SHARE = 0.2
"""At most this share of the event loop's time goes to encoding the state."""

def _registry() -> dict[str, type | None]:
    """Map each dataclass defined in a simulator module to its name (None where two modules share a name)."""
    found: dict[str, type | None] = {}
    for info in pkgutil.iter_modules(kite_sim.__path__):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{kite_sim.__name__}.{info.name}")
        for name, obj in vars(module).items():
            if isinstance(obj, type) and dataclasses.is_dataclass(obj) and obj.__module__ == module.__name__:
                found[name] = None if name in found and found[name] is not obj else obj
    return found


REGISTRY: dict[str, type | None] = {}
"""The dataclasses the state file may contain, by name (nothing else is ever built from it); filled on first use."""


def registered(name: str) -> type | None:
    """Return the simulator dataclass called `name`, if there is exactly one."""
    if not REGISTRY:
        REGISTRY.update(_registry())
    return REGISTRY.get(name)


class StateFileError(ValueError):
    """The state file cannot be read back."""


class Encoder:
    """Turn the state into JSON-ready data, each shared object once."""

    def __init__(self) -> None:
        self.ids: dict[int, int] = {}

    def encode(self, value: Any) -> Any:
        """Encode one value, recursing into containers and dataclasses."""
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if isinstance(value, Instrument):
            return {"$ins": value.instrument_token}
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            if registered(type(value).__name__) is not type(value):
                raise TypeError(f"cannot store a {type(value).__name__}: not a simulator dataclass")
            seen = self.ids.get(id(value))
            if seen is not None:
                return {"$ref": seen}
            self.ids[id(value)] = ref = len(self.ids)
            return {"$dc": type(value).__name__, "$id": ref,
                    "f": {f.name: self.encode(getattr(value, f.name)) for f in dataclasses.fields(value)}}
        if isinstance(value, dict):
            return {"$map": [[self.encode(k), self.encode(v)] for k, v in value.items()]}
        if isinstance(value, list):
            return [self.encode(v) for v in value]
        if isinstance(value, tuple):
            return {"$tuple": [self.encode(v) for v in value]}
        if isinstance(value, (set, frozenset)):
            return {"$set": [self.encode(v) for v in value]}
        if isinstance(value, deque):
            return {"$deque": [self.encode(v) for v in value]}
        raise TypeError(f"cannot store a {type(value).__name__}")

    def encode_parts(self, parts: dict[str, Any]) -> dict[str, Any]:
        """Encode each part that can be stored; leave out (and log) parts that cannot, such as callbacks."""
        out = {}
        for name, value in parts.items():
            mark = len(self.ids)
            try:
                out[name] = self.encode(value)
            except TypeError as exc:
                # Objects first met inside the dropped part must not be referred to from later parts.
                self.ids = dict(itertools.islice(self.ids.items(), mark))
                log.warning("left out of the state file", part=name, reason=str(exc))
        return out


class Decoder:
    """Rebuild the state from `Encoder` output; references resolve to one object each."""

    def __init__(self, market: Market) -> None:
        self.market = market
        self.objects: dict[int, Any] = {}

    def decode(self, data: Any) -> Any:
        """Decode one value."""
        if isinstance(data, list):
            return [self.decode(v) for v in data]
        if not isinstance(data, dict):
            return data
        if "$ins" in data:
            ins = self.market.by_token.get(data["$ins"])
            if ins is None:
                raise StateFileError(f"unknown instrument token {data['$ins']}")
            return ins
        if "$ref" in data:
            return self.objects[data["$ref"]]
        if "$dc" in data:
            return self._dataclass(data)
        if "$map" in data:
            return {self.decode(k): self.decode(v) for k, v in data["$map"]}
        if "$tuple" in data:
            return tuple(self.decode(v) for v in data["$tuple"])
        if "$set" in data:
            return {self.decode(v) for v in data["$set"]}
        if "$deque" in data:
            return deque(self.decode(v) for v in data["$deque"])
        raise StateFileError(f"unknown entry {sorted(data)[:3]}")

    def _dataclass(self, data: dict[str, Any]) -> Any:
        cls = registered(data["$dc"])
        if cls is None:
            raise StateFileError(f"unknown type {data['$dc']!r}")
        obj = object.__new__(cls)
        # Registered before its fields, so objects inside that point back at it find it.
        self.objects[data["$id"]] = obj
        saved = data["f"]
        for f in dataclasses.fields(cls):
            if f.name in saved:
                value = self.decode(saved[f.name])
            elif f.default is not dataclasses.MISSING:
                value = f.default
            elif f.default_factory is not dataclasses.MISSING:
                value = f.default_factory()
            else:
                raise StateFileError(f"{cls.__name__}.{f.name} missing from the state file")
            object.__setattr__(obj, f.name, value)
        return obj


_WRITE_LOCK = threading.Lock()  # a write still running in its thread and the shutdown write share the temp file


def write_private_atomically(path: Path, data: bytes) -> None:
    """Write `data` to `path` readable by the owner only, all or nothing."""
    with _WRITE_LOCK:
        _write(path, data)


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class StateStore:
    """Load the simulator's state at start; write it on change and at shutdown."""

    def __init__(self, path: Path, market: Market, book: Book, portfolio: Portfolio) -> None:
        self.path = path
        self.market, self.book, self.portfolio = market, book, portfolio
        self.dirty = asyncio.Event()
        self.debounce_s = MIN_DEBOUNCE_S
        self.writes = 0
        self.last_error: str | None = None
        self._fingerprint: tuple[int, ...] = ()

    def mark_dirty(self) -> None:
        """Note that the state changed; it is written after the debounce."""
        self.dirty.set()

    def snapshot(self) -> bytes:
        """Encode the whole state."""
        self.portfolio.forget_closed_accounts()
        encoder = Encoder()
        body = {"book": encoder.encode_parts(self.book.snapshot()), "funds": encoder.encode(self.portfolio.funds),
                "prices": encoder.encode(self.market.price_state())}
        return orjson.dumps({"version": FORMAT_VERSION, "saved_at": time.time(), "state": body})

    def load(self) -> bool:
        """Restore the state file if there is one; a broken file is moved aside. Return whether loaded."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return False
        try:
            doc = orjson.loads(raw)
            if doc.get("version") != FORMAT_VERSION:
                raise StateFileError(f"unsupported state file version {doc.get('version')!r}")
            decoder = Decoder(self.market)
            body = doc["state"]
            state = {"book": {k: decoder.decode(v) for k, v in body["book"].items()},
                     "funds": decoder.decode(body["funds"]), "prices": decoder.decode(body["prices"])}
        except (orjson.JSONDecodeError, StateFileError, KeyError, TypeError, AttributeError) as exc:
            aside = self.path.with_name(f"{self.path.name}.broken-{int(time.time())}")
            self.path.replace(aside)
            log.error("state file unreadable, starting empty", error=str(exc), moved_to=str(aside))
            return False
        self.market.restart(state["prices"])
        self.book.restore(state["book"])
        self.portfolio.funds = state["funds"]
        self._fingerprint = self.fingerprint()
        log.info("state restored", accounts=len(self.book.accounts), orders=len(self.book.orders))
        return True

    def save(self) -> None:
        """Write the state now (blocking; for shutdown)."""
        write_private_atomically(self.path, self.snapshot())
        self.writes += 1

    def fingerprint(self) -> tuple[int, ...]:
        """Return a cheap summary that changes whenever an order changes state."""
        orders = self.book.orders
        return len(self.book.accounts), len(orders), sum(len(o.history) for o in orders.values())

    async def run(self) -> None:
        """Write after each change (debounced) until cancelled."""
        watcher = asyncio.create_task(self._watch_book(), name="state-watch")
        try:
            while True:
                await self.dirty.wait()
                await asyncio.sleep(self.debounce_s)
                self.dirty.clear()
                await self._write()
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher

    async def _watch_book(self) -> None:
        while True:
            await asyncio.sleep(FINGERPRINT_PERIOD_S)
            current = self.fingerprint()
            if current != self._fingerprint:
                self._fingerprint = current
                self.mark_dirty()

    async def _write(self) -> None:
        started = time.perf_counter()
        try:
            data = self.snapshot()
            self.debounce_s = max(MIN_DEBOUNCE_S, (time.perf_counter() - started) / WRITE_SHARE)
            await asyncio.to_thread(write_private_atomically, self.path, data)
        except (OSError, TypeError) as exc:
            self.last_error = f"{type(exc).__name__}: {exc}"
            log.error("state write failed", error=self.last_error)
            return
        self.last_error = None
        self.writes += 1
