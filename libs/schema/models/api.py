"""Model the HTTP API's request and response bodies (data model §4)."""

from __future__ import annotations

import unicodedata
from datetime import date, datetime
from typing import Annotated, Any, Literal, Self
from uuid import UUID

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
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
    "BrokerLoginOut",
    "BrokerSessionRequest",
    "BrokerStatusOut",
    "DeleteAccountRequest",
    "ErrorBody",
    "ErrorResponse",
    "KillSwitchOut",
    "KillSwitchRequest",
    "KillSwitchResult",
    "LoginRequest",
    "OrderLogOut",
    "PasswordChangeRequest",
    "RegisterRequest",
    "RunChangeOut",
    "StartStrategyRequest",
    "StatusResponse",
    "StopStrategyRequest",
    "StrategyCreateRequest",
    "StrategyOut",
    "StrategyUpdateRequest",
    "TokenOut",
    "UserOut",
    "WEEKDAYS",
    "Weekday",
    "error_details",
    "weekday_numbers",
]

def _normalise_email(value: Any) -> Any:
    # NFKC folds fullwidth and other compatibility forms onto their plain letters, so
    # "ａsha@x.com" and "asha@x.com" are one account.
    return unicodedata.normalize("NFKC", value).strip() if isinstance(value, str) else value


def _script(char: str) -> str | None:
    # The first word of a letter's Unicode name is its script ("LATIN", "CYRILLIC", "GREEK").
    if not char.isalpha():
        return None
    return unicodedata.name(char, "UNKNOWN").split(" ", 1)[0]


def _single_script_local_part(value: str) -> str:
    local = value.rsplit("@", 1)[0]
    scripts = {s for s in map(_script, local) if s is not None}
    if len(scripts) > 1:
        # "ashа" with a Cyrillic "а" looks like "asha": refuse the mix instead of a look-alike account.
        raise ValueError("the part before @ mixes letters of different scripts "
                         f"({', '.join(sorted(scripts))}); use one script")
    return value.lower()


# Emails are normalised (NFKC) and stored lower-cased, so register and login compare that form.
Email = Annotated[EmailStr, BeforeValidator(_normalise_email), AfterValidator(_single_script_local_part)]
Password = Annotated[str, Field(min_length=8, max_length=128, repr=False)]


def refuse_weak_password(password: str, email: str | None, loc: str = "password") -> None:
    """Raise ValueError for one of the commonest passwords, or one made of the email."""
    folded = password.strip().lower()
    if folded in COMMON_PASSWORDS:
        raise ValueError(f"{loc} is one of the most common passwords; choose another")
    if email:
        local = email.rsplit("@", 1)[0].lower()
        if folded in (email.lower(), local) or (len(local) >= 4 and local in folded and len(folded) - len(local) < 4):
            raise ValueError(f"{loc} must not be your email address")
PersonName = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=100)]

WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
Weekday = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
Repeat = Literal["once", "trading_days"]
TokenState = Literal["valid", "expired", "unknown"]


def weekday_numbers(names: list[str] | None) -> list[int] | None:
    """Return weekday names as sorted numbers (0 = Monday), None for None."""
    return None if names is None else sorted({WEEKDAYS.index(name) for name in names})


def _weekday_names(value: Any) -> Any:
    # Rows store numbers; the API speaks names.
    if isinstance(value, list | tuple):
        return [WEEKDAYS[v] if isinstance(v, int) and 0 <= v < 7 else v for v in value]
    return value


Weekdays = Annotated[list[Weekday], Field(min_length=1, max_length=7)]


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

    @model_validator(mode="after")
    def _check_password(self) -> Self:
        refuse_weak_password(self.password, self.email)
        return self


class LoginRequest(_SecretRequest):
    """Exchange email and password for a token (data model §4.2)."""

    email: Email
    # No minimum beyond non-empty: the stored hash decides, not the length rule.
    password: str = Field(min_length=1, max_length=128, repr=False)


class PasswordChangeRequest(_SecretRequest):
    """Change the caller's password; every session issued before is revoked."""

    current_password: str = Field(min_length=1, max_length=128, repr=False)
    new_password: Password

    @model_validator(mode="after")
    def _check_password(self) -> Self:
        refuse_weak_password(self.new_password, None, "new_password")
        return self


class DeleteAccountRequest(_SecretRequest):
    """Delete the caller's account: confirm with the password; square_off sells open positions first."""

    password: str = Field(min_length=1, max_length=128, repr=False)
    square_off: bool = Field(default=False, strict=True)


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
    token_state: TokenState = Field("unknown", description="The broker's last answer about the access token.")
    token_checked_at: datetime | None = Field(None, description="When the broker was last asked.")
    token_expires_at: datetime | None = Field(None, description="06:00 IST after the token was issued.")


class BrokerLoginOut(_Response):
    """Where to send the browser for today's Kite login."""

    login_url: str
    state_expires_in: int = Field(description="Seconds the login link stays usable (once).")


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
    repeat: Repeat = Field("once", description="`trading_days`: run again on every trading day until stopped.")
    weekdays: Weekdays | None = Field(None, description="With `trading_days`: only these days of the week.")
    allow_stop_loss_above_price: bool = Field(
        default=False, strict=True,
        description="Accept a stop_loss at or above the last price (it fires right after the BUY).")

    @model_validator(mode="after")
    def _check_times(self) -> Self:
        require_buy_before_sell(self.buy_time, self.sell_time)
        _require_repeat_for_weekdays(self.repeat, self.weekdays)
        return self


def _require_repeat_for_weekdays(repeat: str | None, weekdays: list[str] | None) -> None:
    if weekdays is not None and repeat == "once":
        raise ValueError("weekdays need repeat `trading_days`")


class StrategyUpdateRequest(_Request):
    """Change some fields of a stopped strategy; omitted fields stay as they are."""

    symbol: Symbol | None = None
    buy_time: ClockTime | None = None
    sell_time: ClockTime | None = None
    stop_loss: StopLoss | None = None
    quantity: Quantity | None = None
    repeat: Repeat | None = None
    weekdays: Weekdays | None = None

    @model_validator(mode="after")
    def _check_times(self) -> Self:
        # With one time given, the API checks it against the stored other one.
        require_buy_before_sell(self.buy_time, self.sell_time)
        _require_repeat_for_weekdays(self.repeat, self.weekdays)
        return self


class StartStrategyRequest(_Request):
    """Start a strategy (data model §4.5)."""

    strategy_id: UUID
    allow_stop_loss_above_price: bool = Field(
        default=False, strict=True,
        description="Accept a stop_loss at or above the last price (it fires right after the BUY).")


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
    repeat: Repeat = "once"
    weekdays: Annotated[list[Weekday] | None, BeforeValidator(_weekday_names)] = None


class StatusResponse(_Response):
    """Live status of a strategy (data model §4.7): the day it trades, whether it needs a login, and money.

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
    trading_day: date | None = Field(None, description="The day the current (or last) run trades.")
    next_buy_at: datetime | None = Field(None, description="When the running run buys, if it has not yet.")
    next_sell_at: datetime | None = Field(None, description="When the running run sells, if it holds or will.")
    repeat: Repeat = "once"
    needs_login: bool = Field(False, description="The Kite session is expired: the run cannot trade until "
                                                 "the user logs in (GET /api/v1/broker/login).")
    reason: str | None = Field(None, description="Why the strategy needs attention, or why it failed.")


class KillSwitchRequest(_Request):
    """Stop every running strategy of the caller; optionally square off every held position."""

    square_off: bool = Field(default=False, strict=True)


class KillSwitchResult(_Response):
    """What the kill switch did to one strategy."""

    strategy_id: UUID
    symbol: str
    status: StrategyStatus
    position: Position
    action: Literal["stopped", "squaring_off", "unchanged", "busy"] = Field(
        description="`stopped`: unloaded; `squaring_off`: stopped, its exit order is queued; `unchanged`: "
                    "it was not running; `busy`: an order stayed in flight, press again.")


class KillSwitchOut(_Response):
    """Per-strategy summary of a kill-switch press."""

    strategies: list[KillSwitchResult]
    stopped: int
    squaring_off: int


class RunChangeOut(StatusResponse):
    """Answer of start and stop: the status, whether this call changed anything, and what happened."""

    changed: bool
    reason: str


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


# The commonest passwords of at least 8 characters (public breach lists); refused at registration.
COMMON_PASSWORDS = frozenset("""
password 12345678 123456789 1234567890 password1 password123 11111111 00000000 12341234 87654321
qwertyuiop qwerty123 qwerty12 1q2w3e4r 1qaz2wsx zaq12wsx iloveyou sunshine princess football baseball
welcome1 welcome123 abc12345 abcd1234 trustno1 superman letmein1 passw0rd p@ssw0rd p@ssword admin123
administrator changeme 123123123 11223344 q1w2e3r4 asdfghjk asdfasdf qwertyui 88888888 99999999
66666666 55555555 22222222 12121212 123qweasd qweasdzxc computer internet starwars whatever
dragon12 michael1 jennifer charlie1 monkey123 shadow12 master12 killer12 freedom1 mustang1
""".split())


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
