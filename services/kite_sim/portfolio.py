"""Kite portfolio routes: margins, holdings, positions, convert_position; and paper funds.

Every account starts with opening cash in the equity segment (settable per
account through the loopback-only admin route `POST /sim/accounts/{api_key}/portfolio`,
which can also seed holdings). Margins are derived from the book on every
call, so they can never drift from the orders and positions:
- MIS: 20% of the value of the open quantity (plus pending orders that add to
  it) is blocked as `exposure`; squaring off releases it.
- CNC/NRML buys block their full value as `delivery`.
- Booked P&L moves the balance both ways (`m2m_realised`); open P&L only
  blocks losses (`m2m_unrealised`), as a broker's risk system does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from pydantic import BaseModel, Field, ValidationError

from services.kite_sim.admin import AdminError, admin_endpoint, read_json
from services.kite_sim.book import CANCELLED, COMPLETE, REJECTED, Account, Book, Position
from services.kite_sim.faults import Faults
from services.kite_sim.market import Instrument, Market
from services.kite_sim.rest import PRODUCTS, KiteRest, input_error, kite_endpoint

MIS_MARGIN_FRACTION = 0.2
"""MIS leverage of 5x: a fifth of the position's value is blocked."""
DEFAULT_OPENING_CASH = 1_000_000.0
SEGMENTS = ("equity", "commodity")
DONE = {COMPLETE, CANCELLED, REJECTED}


@dataclass(slots=True)
class Holding:
    """Shares held in demat: seeded through the admin route."""

    instrument: Instrument
    quantity: int
    average_paise: int


@dataclass(slots=True)
class Funds:
    """One account's paper money and holdings."""

    equity_paise: int
    commodity_paise: int = 0
    holdings: list[Holding] = field(default_factory=list)


class HoldingIn(BaseModel):
    """One holding to seed."""

    tradingsymbol: str
    quantity: int = Field(gt=0)
    average_price: float = Field(gt=0)


class PortfolioIn(BaseModel):
    """Admin body: replace an account's opening cash and holdings."""

    cash: float | None = Field(default=None, ge=0)
    commodity_cash: float | None = Field(default=None, ge=0)
    holdings: list[HoldingIn] | None = None


def money(value: float) -> float:
    """Round rupees to paise (never -0.0)."""
    return round(value, 2) + 0.0


def segment_margins(opening: float, exposure: float = 0.0, delivery: float = 0.0, realised: float = 0.0,
                    unrealised: float = 0.0, holding_sales: float = 0.0) -> dict[str, Any]:
    """Render Kite's margins of one segment from utilised amounts (rupees)."""
    m2m_realised = -realised
    m2m_unrealised = max(-unrealised, 0.0)
    debits = exposure + delivery + m2m_realised + m2m_unrealised
    live = money(opening - debits)
    return {
        "enabled": True,
        "net": live,
        "available": {"adhoc_margin": 0, "cash": money(opening), "opening_balance": money(opening),
                      "live_balance": live, "collateral": 0, "intraday_payin": 0},
        "utilised": {"debits": money(debits), "exposure": money(exposure), "m2m_realised": money(m2m_realised),
                     "m2m_unrealised": money(m2m_unrealised), "option_premium": 0, "payout": 0, "span": 0,
                     "holding_sales": money(holding_sales), "turnover": 0, "liquid_collateral": 0,
                     "stock_collateral": 0, "delivery": money(delivery)},
    }


def isin_of(ins: Instrument) -> str:
    """Return a stable made-up 12-character ISIN."""
    return f"INE{ins.exchange_token % 10**6:06d}01{ins.instrument_token % 10}"


class Portfolio:
    """Hold each account's funds and holdings; work out margins from the book."""

    def __init__(self, market: Market, book: Book, opening_cash: float = DEFAULT_OPENING_CASH) -> None:
        self.market = market
        self.book = book
        self.opening_paise = round(opening_cash * 100)
        self.funds: dict[str, Funds] = {}

    def funds_of(self, account: Account) -> Funds:
        """Return the account's funds, opening them on first use."""
        funds = self.funds.get(account.api_key)
        if funds is None:
            funds = self.funds[account.api_key] = Funds(self.opening_paise)
        return funds

    def margins(self, account: Account) -> dict[str, dict[str, Any]]:
        """Return both segments' margins."""
        funds = self.funds_of(account)
        exposure = delivery = realised = unrealised = holding_sales = 0.0
        pending = self._pending_quantities(account)
        for (symbol, product), pos in account.positions.items():
            row = pos.as_kite(self.market.quote(pos.instrument))
            realised += row["realised"]
            unrealised += row["unrealised"]
            buys, sells = pending.pop((symbol, product), (0, 0))
            exposure_add, delivery_add = self._blocked(pos.instrument, product, row["quantity"], buys, sells)
            exposure += exposure_add
            delivery += delivery_add
            if product == "CNC":
                holding_sales += row["sell_value"]
        for (symbol, product), (buys, sells) in pending.items():
            ins = self.market.by_symbol[symbol]
            exposure_add, delivery_add = self._blocked(ins, product, 0, buys, sells)
            exposure += exposure_add
            delivery += delivery_add
        return {
            "equity": segment_margins(funds.equity_paise / 100, exposure, delivery, realised, unrealised,
                                      holding_sales),
            "commodity": segment_margins(funds.commodity_paise / 100),
        }

    def _pending_quantities(self, account: Account) -> dict[tuple[str, str], tuple[int, int]]:
        out: dict[tuple[str, str], tuple[int, int]] = {}
        for order in account.orders.values():
            if order.status in DONE:
                continue
            key = (order.instrument.tradingsymbol, order.product)
            buys, sells = out.get(key, (0, 0))
            left = order.quantity - order.filled_quantity
            out[key] = (buys + left, sells) if order.transaction_type == "BUY" else (buys, sells + left)
        return out

    def _blocked(self, ins: Instrument, product: str, qty: int, buys: int, sells: int) -> tuple[float, float]:
        """Return (exposure, delivery) blocked for a position and its pending orders."""
        worst = max(qty + buys, -(qty - sells), 0)
        value = worst * self.market.last_price(ins)
        if product == "MIS":
            return value * MIS_MARGIN_FRACTION, 0.0
        return 0.0, max(qty + buys, 0) * self.market.last_price(ins)

    def holdings(self, account: Account) -> list[dict[str, Any]]:
        """Render the account's holdings, marked to the live price."""
        out = []
        for h in self.funds_of(account).holdings:
            ins, q = h.instrument, self.market.quote(h.instrument)
            pos = account.positions.get((ins.tradingsymbol, "CNC"))
            used = min(h.quantity, max(pos.sell_quantity - pos.buy_quantity, 0)) if pos else 0
            last, close, avg = q.last / 100, q.close / 100, h.average_paise / 100
            out.append({
                "tradingsymbol": ins.tradingsymbol, "exchange": ins.exchange,
                "instrument_token": ins.instrument_token, "isin": isin_of(ins), "product": "CNC", "price": 0,
                "quantity": h.quantity, "used_quantity": used, "t1_quantity": 0, "realised_quantity": h.quantity,
                "authorised_quantity": 0, "authorised_date": "", "authorisation": {},
                "opening_quantity": h.quantity, "short_quantity": 0, "collateral_quantity": 0,
                "collateral_type": "", "discrepancy": False, "average_price": avg, "last_price": last,
                "close_price": close, "pnl": money((last - avg) * h.quantity),
                "day_change": money(last - close),
                "day_change_percentage": (last - close) / close * 100 if close else 0.0,
                "mtf": {"quantity": 0, "used_quantity": 0, "average_price": 0, "value": 0, "initial_margin": 0},
            })
        return out

    def convert(self, account: Account, ins: Instrument, side: str, quantity: int, old: str, new: str) -> None:
        """Move `quantity` of an open day position from product `old` to `new` at its average price."""
        pos = account.positions.get((ins.tradingsymbol, old))
        open_qty = pos.buy_quantity - pos.sell_quantity if pos else 0
        if pos is None or (open_qty > 0) != (side == "BUY") or open_qty == 0:
            raise input_error(f"No open {side} {old} position in {ins.tradingsymbol} to convert.")
        if quantity > abs(open_qty):
            raise input_error(f"Cannot convert {quantity}: only {abs(open_qty)} open in {ins.tradingsymbol} {old}.")
        key = (ins.tradingsymbol, new)
        target = account.positions.get(key) or account.positions.setdefault(key, Position(ins, new))
        if side == "BUY":
            moved = round(pos.buy_value * quantity / pos.buy_quantity)
            pos.buy_quantity -= quantity
            pos.buy_value -= moved
            target.buy_quantity += quantity
            target.buy_value += moved
        else:
            moved = round(pos.sell_value * quantity / pos.sell_quantity)
            pos.sell_quantity -= quantity
            pos.sell_value -= moved
            target.sell_quantity += quantity
            target.sell_value += moved
        if pos.buy_quantity == 0 and pos.sell_quantity == 0:
            del account.positions[(ins.tradingsymbol, old)]

    def seed(self, account: Account, body: PortfolioIn) -> Funds:
        """Replace opening cash and/or holdings of an account."""
        funds = self.funds_of(account)
        if body.cash is not None:
            funds.equity_paise = round(body.cash * 100)
        if body.commodity_cash is not None:
            funds.commodity_paise = round(body.commodity_cash * 100)
        if body.holdings is not None:
            holdings = []
            for h in body.holdings:
                ins = self.market.resolve(h.tradingsymbol)
                if ins is None:
                    raise AdminError(400, f"unknown symbol {h.tradingsymbol!r}")
                holdings.append(Holding(ins, h.quantity, round(h.average_price * 100)))
            funds.holdings = holdings
        return funds

    def forget_closed_accounts(self) -> None:
        """Drop funds of accounts the book no longer has (after a reset)."""
        for api_key in [k for k in self.funds if k not in self.book.accounts]:
            del self.funds[api_key]


class PortfolioApi(KiteRest):
    """Serve Kite's portfolio and margins routes, and the admin seeding route."""

    def __init__(self, market: Market, book: Book, faults: Faults, portfolio: Portfolio) -> None:
        super().__init__(market, book, faults)
        self.portfolio = portfolio

    def routes(self) -> list[web.RouteDef]:
        """Return the portfolio routes."""
        return [
            web.get("/user/margins", self.margins),
            web.get("/user/margins/{segment}", self.margins),
            web.get("/portfolio/holdings", self.holdings),
            web.get("/portfolio/positions", self.positions),
            web.put("/portfolio/positions", self.convert_position),
            web.post("/sim/accounts/{api_key}/portfolio", self.seed),
        ]

    @kite_endpoint("portfolio")
    async def margins(self, request: web.Request, account: Account | None) -> Any:
        """Return funds and margins of both segments, or of `/user/margins/{segment}`."""
        assert account is not None
        segment = request.match_info.get("segment")
        if segment is not None and segment not in SEGMENTS:
            raise input_error(f"Invalid segment `{segment}`: use equity or commodity.")
        margins = self.portfolio.margins(account)
        return margins if segment is None else margins[segment]

    @kite_endpoint("portfolio")
    async def holdings(self, request: web.Request, account: Account | None) -> Any:
        """Return the account's holdings."""
        assert account is not None
        return self.portfolio.holdings(account)

    @kite_endpoint("portfolio")
    async def positions(self, request: web.Request, account: Account | None) -> Any:
        """Return net and day positions (everything is bought today here, so they agree)."""
        assert account is not None
        positions = self.book.positions_of(account)
        return {"net": positions, "day": [dict(p) for p in positions]}

    @kite_endpoint("portfolio")
    async def convert_position(self, request: web.Request, account: Account | None) -> Any:
        """Change an open position's product (MIS <-> CNC/NRML)."""
        assert account is not None
        form = await request.post()
        exchange, symbol = str(form.get("exchange", "")), str(form.get("tradingsymbol", ""))
        ins = self.market.resolve(f"{exchange}:{symbol}") if exchange and symbol else None
        if ins is None:
            raise input_error(f"Invalid `tradingsymbol` or `exchange`: {exchange}:{symbol}.")
        side = str(form.get("transaction_type", ""))
        if side not in ("BUY", "SELL"):
            raise input_error("Invalid `transaction_type`.")
        position_type = str(form.get("position_type", ""))
        if position_type not in ("day", "overnight"):
            raise input_error("Invalid `position_type`: use day or overnight.")
        if position_type == "overnight":
            raise input_error(f"No overnight position in {symbol} to convert.")
        try:
            quantity = int(str(form.get("quantity", "")))
        except ValueError:
            raise input_error("Invalid `quantity`.") from None
        if quantity <= 0:
            raise input_error("Invalid `quantity`.")
        old, new = str(form.get("old_product", "")), str(form.get("new_product", ""))
        if old not in PRODUCTS or new not in PRODUCTS or old == new:
            raise input_error("Invalid `old_product` or `new_product`.")
        self.portfolio.convert(account, ins, side, quantity, old, new)
        return True

    @admin_endpoint
    async def seed(self, request: web.Request) -> Any:
        """Admin: set an account's opening cash and holdings ({"cash", "commodity_cash", "holdings"})."""
        account = self.book.accounts.get(request.match_info["api_key"])
        if account is None:
            raise AdminError(404, "unknown api_key")
        try:
            body = PortfolioIn.model_validate(await read_json(request) or {})
        except ValidationError as exc:
            raise AdminError(400, f"invalid portfolio: {exc.errors(include_url=False)}") from exc
        funds = self.portfolio.seed(account, body)
        return {"cash": funds.equity_paise / 100, "commodity_cash": funds.commodity_paise / 100,
                "holdings": len(funds.holdings)}
