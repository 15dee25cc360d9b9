"""Kite market-data routes: quote, ohlc, ltp, trigger_range, historical candles.

Instruments are given as repeated `i=EXCHANGE:SYMBOL` (or `i=INSTRUMENT_TOKEN`);
unknown ones are left out of the answer, as Kite does. Depth and circuit
limits are the ones order matching and validation use (`depth.py`). Candles
come from `candles.py`: the recorded path since start, generated before; or,
with an upstream REST root, from the upstream whose prices are being ticked.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import aiohttp
from aiohttp import web

from services.kite_sim.book import IST, Account, Book, kite_time
from services.kite_sim.candles import Candle, day_candles, minute_candles, resample
from services.kite_sim.depth import LEVELS, price_band
from services.kite_sim.faults import Faults
from services.kite_sim.market import IST_OFFSET_S, Instrument, Market, Quote, ist_day
from services.kite_sim.order_rules import OrderRules
from services.kite_sim.rest import KiteError, KiteRest, input_error, kite_endpoint
from services.kite_sim.upstream import UpstreamHistory

MAX_QUOTE_INSTRUMENTS = 500
MAX_OHLC_INSTRUMENTS = 1000
TRIGGER_RANGE_FRACTION = 0.05
"""Cover-order stop-loss trigger band: within 5% of the last price, on the losing side."""
INTERVALS = {"minute": 1, "3minute": 3, "5minute": 5, "10minute": 10, "15minute": 15, "30minute": 30,
             "60minute": 60, "day": 0}
MAX_DAYS = {"minute": 60, "3minute": 100, "5minute": 100, "10minute": 100, "15minute": 200, "30minute": 200,
            "60minute": 400, "day": 2000}
"""Kite's longest `from`..`to` span per request, by interval."""


def rupees(paise: int) -> float:
    """Convert paise to rupees."""
    return paise / 100


def ohlc_of(q: Quote) -> dict[str, float]:
    """Return the day's OHLC in rupees."""
    return {"open": rupees(q.open), "high": rupees(q.high), "low": rupees(q.low), "close": rupees(q.close)}


EMPTY_LEVEL = {"price": 0.0, "quantity": 0, "orders": 0}


def full_quote(q: Quote, book: Book, band_pct: float) -> dict[str, Any]:
    """Render a quote as Kite's `/quote` entry: depth is what matching would fill against now."""
    depth = book.depth_of(q.instrument)
    for side in depth.values():
        side.extend(dict(EMPTY_LEVEL) for _ in range(LEVELS - len(side)))  # Kite always shows five levels
    lower, upper = price_band(q, band_pct)
    total = LEVELS * book.liquidity.depth_quantity  # as the ticker's quote packets show it
    return {
        "instrument_token": q.instrument.instrument_token,
        "timestamp": kite_time(q.updated_at),
        "last_trade_time": kite_time(q.updated_at),
        "last_price": rupees(q.last),
        "last_quantity": q.last_qty,
        "buy_quantity": total,
        "sell_quantity": total,
        "volume": q.volume,
        "average_price": rupees(q.average_paise()),
        "oi": 0,
        "oi_day_high": 0,
        "oi_day_low": 0,
        "net_change": round(rupees(q.last - q.close), 2),
        "lower_circuit_limit": rupees(lower),
        "upper_circuit_limit": rupees(upper),
        "ohlc": ohlc_of(q),
        "depth": depth,
    }


def parse_kite_date(raw: str, field: str) -> int:
    """Parse `yyyy-mm-dd[ HH:MM:SS]` (IST) into an epoch."""
    for fmt in ("%Y-%m-%d %H:%M:%S", "%Y-%m-%d"):
        try:
            naive = datetime.strptime(raw, fmt)
        except ValueError:
            continue
        return int((naive - datetime(1970, 1, 1)).total_seconds()) - IST_OFFSET_S
    raise input_error(f"Invalid `{field}` date: use yyyy-mm-dd or yyyy-mm-dd hh:mm:ss.")


def candle_row(c: Candle, with_oi: bool) -> list[Any]:
    """Render a candle as Kite's array: [timestamp, open, high, low, close, volume(, oi)]."""
    row: list[Any] = [kite_iso(c[0]), rupees(c[1]), rupees(c[2]), rupees(c[3]), rupees(c[4]), c[5]]
    if with_oi:
        row.append(0)
    return row


def kite_iso(epoch: int) -> str:
    """Format an epoch as Kite's candle timestamp, `2017-12-15T09:15:00+0530`."""
    return datetime.fromtimestamp(epoch, IST).strftime("%Y-%m-%dT%H:%M:%S%z")


class QuotesApi(KiteRest):
    """Serve Kite's market-data routes over the simulated market (history from upstream when configured)."""

    def __init__(self, market: Market, book: Book, faults: Faults, rules: OrderRules,
                 history: UpstreamHistory | None = None) -> None:
        super().__init__(market, book, faults, rules)
        self.history = history

    def routes(self) -> list[web.RouteDef]:
        """Return the market-data routes."""
        return [
            web.get("/quote", self.quote),
            web.get("/quote/ohlc", self.ohlc),
            web.get("/quote/ltp", self.ltp),
            web.get("/instruments/trigger_range/{transaction_type}", self.trigger_range),
            web.get("/instruments/historical/{instrument_token}/{interval}", self.historical),
        ]

    def _instruments(self, request: web.Request, limit: int) -> list[tuple[str, Instrument]]:
        keys = request.query.getall("i", [])
        if not keys:
            raise input_error("No instruments specified: pass one or more `i=EXCHANGE:TRADINGSYMBOL`.")
        if len(keys) > limit:
            raise input_error(f"Too many instruments: at most {limit} per request.")
        out = []
        for key in keys:
            ins = self.market.by_token.get(int(key)) if key.isdigit() else (
                self.market.resolve(key) if ":" in key else None)
            if ins is not None:
                out.append((key, ins))
        return out

    @kite_endpoint("quote")
    async def quote(self, request: web.Request, account: Account | None) -> Any:
        """Return full quotes: last trade, OHLC, volume, circuit limits and five-level depth."""
        return {key: full_quote(self.market.quote(ins), self.book, self.rules.band_pct)
                for key, ins in self._instruments(request, MAX_QUOTE_INSTRUMENTS)}

    @kite_endpoint("quote")
    async def ohlc(self, request: web.Request, account: Account | None) -> Any:
        """Return last price and the day's OHLC."""
        out = {}
        for key, ins in self._instruments(request, MAX_OHLC_INSTRUMENTS):
            q = self.market.quote(ins)
            out[key] = {"instrument_token": ins.instrument_token, "last_price": rupees(q.last), "ohlc": ohlc_of(q)}
        return out

    @kite_endpoint("quote")
    async def ltp(self, request: web.Request, account: Account | None) -> Any:
        """Return last prices."""
        return {key: {"instrument_token": ins.instrument_token, "last_price": self.market.last_price(ins)}
                for key, ins in self._instruments(request, MAX_OHLC_INSTRUMENTS)}

    @kite_endpoint("quote")
    async def trigger_range(self, request: web.Request, account: Account | None) -> Any:
        """Return the cover-order trigger band: below the last price for buy, above it for sell."""
        side = request.match_info["transaction_type"].lower()
        if side not in ("buy", "sell"):
            raise input_error("Invalid `transaction_type`: use buy or sell.")
        out = {}
        for key, ins in self._instruments(request, MAX_OHLC_INSTRUMENTS):
            last = self.market.last_price(ins)
            far = round(last * (1 - TRIGGER_RANGE_FRACTION if side == "buy" else 1 + TRIGGER_RANGE_FRACTION), 5)
            lower, upper = (far, last) if side == "buy" else (last, far)
            out[key] = {"instrument_token": ins.instrument_token, "lower": lower, "upper": upper}
        return out

    @kite_endpoint("quote")
    async def historical(self, request: web.Request, account: Account | None) -> Any:
        """Return candles of one instrument between `from` and `to` (IST, inclusive)."""
        raw_token, interval = request.match_info["instrument_token"], request.match_info["interval"]
        ins = self.market.by_token.get(int(raw_token)) if raw_token.isdigit() else None
        if ins is None:
            raise input_error("Invalid `instrument_token`.")
        if interval not in INTERVALS:
            raise input_error(f"Invalid `interval`: use one of {', '.join(INTERVALS)}.")
        start = parse_kite_date(request.query.get("from", ""), "from")
        end = parse_kite_date(request.query.get("to", ""), "to")
        if start > end:
            raise input_error("`from` date is after `to` date.")
        if end - start > MAX_DAYS[interval] * 86400:
            raise input_error(f"Interval exceeds max limit: {MAX_DAYS[interval]} days for {interval} candles.")
        with_oi = request.query.get("oi") == "1"
        token = ins.instrument_token
        if self.history is not None:
            return await self._upstream_candles(token, interval, request)
        if interval == "day":
            candles = day_candles(self.market, token, ist_day(start), ist_day(end))
        else:
            candles = resample(minute_candles(self.market, token, start, end), INTERVALS[interval])
        return {"candles": [candle_row(c, with_oi) for c in candles]}

    async def _upstream_candles(self, token: int, interval: str, request: web.Request) -> Any:
        query = {k: request.query[k] for k in ("from", "to", "continuous", "oi") if k in request.query}
        assert self.history is not None
        try:
            status, body = await self.history.candles(token, interval, query)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise KiteError(502, "NetworkException", f"Upstream historical data unavailable: {exc}") from None
        if status == 200 and body.get("status") == "success":
            return body["data"]
        message = str(body.get("message") or "failed")
        if status == 400:
            raise input_error(message)  # the request itself was bad: the user can fix it
        # Anything else is the upstream's problem (its token too), never a TokenException for the paper user.
        raise KiteError(502, "NetworkException", f"Upstream historical data unavailable: {message}")
