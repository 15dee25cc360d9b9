"""Model the HTTP API's request and response bodies (data model §4)."""

from __future__ import annotations

from datetime import date, datetime
from typing import Annotated, Any, Literal, Self
from uuid import UUID

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    EmailStr,
    Field,
    StringConstraints,
    ValidationError,
    model_validator,
)

from libs.schema.models.messages import plain_message
from libs.schema.models.types import (
    BrokerToken,
    ClockTime,
    EventType,
    LastAction,
    OrderLogStatus,
    Position,
    Quantity,
    SecretBrokerToken,
    StopLoss,
    StrategyStatus,
    Symbol,
    require_buy_before_sell,
)

__all__ = [
    "BrokerConnectOut",
    "BrokerConnectRequest",
    "BrokerSessionRequest",
    "BrokerStatusOut",
    "ErrorBody",
    "ErrorResponse",
    "LoginRequest",
    "OrderLogOut",
    "RegisterRequest",
    "StartStrategyRequest",
    "StatusResponse",
    "StopStrategyRequest",
    "StrategyCreateRequest",
    "StrategyOut",
    "StrategyUpdateRequest",
    "TokenOut",
    "UserOut",
    "error_details",
]

# Emails are stored lower-cased, so both register and login compare that form.
Email = Annotated[EmailStr, AfterValidator(str.lower)]
Password = Annotated[str, Field(min_length=8, max_length=128, repr=False)]
PersonName = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=100)]


class _Request(BaseModel):
    # A misspelt field must be an error, not a silently ignored setting.
    model_config = ConfigDict(extra="forbid")


class _SecretRequest(_Request):
    # Keep passwords and broker secrets out of the text of validation errors,
    # which ends up in logs and tracebacks; error_details() drops inputs too.
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)


class _Response(BaseModel):
    # Built straight from ORM rows in the API.
    model_config = ConfigDict(from_attributes=True)


# --- auth ---------------------------------------------------------------------

class RegisterRequest(_SecretRequest):
    """Create an account (data model §4.1)."""

    email: Email
    password: Password
    name: PersonName


class LoginRequest(_SecretRequest):
    """Exchange email and password for a token (data model §4.2)."""

    email: Email
    # No minimum beyond non-empty: the stored hash decides, not the length rule.
    password: str = Field(min_length=1, max_length=128, repr=False)


class UserOut(_Response):
    """Public view of a user."""

    id: UUID
    email: str
    name: str
    created_at: datetime


class TokenOut(_Response):
    """Bearer token issued at login."""

    access_token: str = Field(repr=False)
    token_type: Literal["bearer"] = "bearer"
    expires_in: int = Field(description="Lifetime of the token in seconds.")


# --- broker -------------------------------------------------------------------

class BrokerConnectRequest(_SecretRequest):
    """Store and verify Kite credentials (data model §4.3)."""

    api_key: BrokerToken
    api_secret: SecretBrokerToken
    access_token: SecretBrokerToken


class BrokerSessionRequest(_SecretRequest):
    """Exchange a Kite login `request_token` for an access token."""

    request_token: Annotated[BrokerToken, Field(repr=False)]


class BrokerStatusOut(_Response):
    """Whether the user has broker credentials and whether they still work."""

    connected: bool
    is_valid: bool
    api_key_hint: str | None = None
    updated_at: datetime | None = None


class BrokerConnectOut(_Response):
    """Result of verifying new broker credentials."""

    is_valid: bool
    api_key_hint: str
    user_name: str | None = None


# --- strategies ---------------------------------------------------------------

class StrategyCreateRequest(_Request):
    """Create a strategy (data model §4.4)."""

    symbol: Symbol
    buy_time: ClockTime
    sell_time: ClockTime
    stop_loss: StopLoss
    quantity: Quantity

    @model_validator(mode="after")
    def _check_times(self) -> Self:
        require_buy_before_sell(self.buy_time, self.sell_time)
        return self


class StrategyUpdateRequest(_Request):
    """Change some fields of a stopped strategy; omitted fields stay as they are."""

    symbol: Symbol | None = None
    buy_time: ClockTime | None = None
    sell_time: ClockTime | None = None
    stop_loss: StopLoss | None = None
    quantity: Quantity | None = None

    @model_validator(mode="after")
    def _check_times(self) -> Self:
        # With one time given, the API checks it against the stored other one.
        require_buy_before_sell(self.buy_time, self.sell_time)
        return self


class StartStrategyRequest(_Request):
    """Start a strategy (data model §4.5)."""

    strategy_id: UUID


class StopStrategyRequest(_Request):
    """Stop a strategy (data model §4.6); square_off sells an open position."""

    strategy_id: UUID
    square_off: bool = Field(default=False, strict=True)


class StrategyOut(_Response):
    """Public view of a strategy."""

    id: UUID
    symbol: str
    buy_time: ClockTime
    sell_time: ClockTime
    stop_loss: float
    quantity: int
    status: StrategyStatus
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None = None
    stopped_at: datetime | None = None
    failure_reason: str | None = None


class StatusResponse(_Response):
    """Live status of a strategy (data model §4.7), with the money of its latest run.

    Prices and P&L come from confirmed fills (the broker's average prices),
    never from requested prices; unrealized P&L marks an open position to the
    last traded price.
    """

    status: StrategyStatus
    position: Position
    last_action: LastAction | None = None
    last_price: float | None = None
    timestamp: datetime
    entry_average_price: float | None = Field(None, description="Average fill price of the run's BUY.")
    exit_average_price: float | None = Field(None, description="Average fill price of the run's exit.")
    filled_quantity: int | None = Field(None, description="Shares bought by the run's filled BUY.")
    realized_pnl: float | None = Field(None, description="(exit - entry) x quantity once exited, in rupees.")
    unrealized_pnl: float | None = Field(None, description="(last price - entry) x quantity while bought.")
    next_action: Literal["BUY", "SELL"] | None = Field(None, description="Next scheduled order of a running run.")
    next_action_at: datetime | None = Field(None, description="When the next scheduled order is due (UTC).")


class OrderLogOut(_Response):
    """One row of a strategy's order log."""

    id: UUID
    strategy_id: UUID
    event_type: EventType
    request_payload: dict[str, Any]
    response_payload: dict[str, Any] | None = None
    status: OrderLogStatus
    created_at: datetime
    trading_day: date | None = None
    broker_order_id: str | None = None
    tag: str | None = None


# --- errors -------------------------------------------------------------------

class ErrorBody(BaseModel):
    """What went wrong: a stable machine code and a human message."""

    code: str
    message: str
    details: Any = None


class ErrorResponse(BaseModel):
    """The one JSON error shape of the API: `{"error": {...}}`."""

    error: ErrorBody


def error_details(error: ValidationError) -> list[dict[str, Any]]:
    """Return a ValidationError as JSON-safe `details`: loc, msg and type of each problem.

    Inputs are left out on purpose: they may be passwords or broker secrets.
    Messages are plain language (`libs.schema.models.messages`): what a person reads next to the field.
    """
    return [
        {"loc": list(item["loc"]), "msg": plain_message(dict(item)), "type": item["type"]}
        for item in error.errors(include_url=False, include_context=True, include_input=False)
    ]
