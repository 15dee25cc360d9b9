"""Say what is wrong with an input in plain words, instead of the validation library's phrasing.

`plain_message` turns one pydantic error item into text a trader reads next
to the field ("must be at least 1", not "Input should be greater than or
equal to 1"); `field_label` names the field in words for a one-line summary.
"""

from __future__ import annotations

from typing import Any

__all__ = ["field_label", "plain_message", "summary_message"]

_LABELS = {
    "symbol": "Symbol", "buy_time": "Buy time", "sell_time": "Sell time", "stop_loss": "Stop-loss",
    "quantity": "Quantity", "email": "Email", "password": "Password", "name": "Name", "api_key": "API key",
    "api_secret": "API secret", "access_token": "Access token", "request_token": "Request token",
    "strategy_id": "Strategy", "square_off": "Square off", "current_password": "Current password",
    "new_password": "New password", "limit": "Limit", "from": "From date", "to": "To date",
}

_FIXED = {
    "missing": "is required",
    "extra_forbidden": "is not a field this request accepts",
    "int_type": "must be a whole number", "int_parsing": "must be a whole number",
    "int_from_float": "must be a whole number",
    "float_type": "must be a number", "float_parsing": "must be a number",
    "finite_number": "must be a finite number",
    "string_type": "must be text",
    "bool_type": "must be true or false", "bool_parsing": "must be true or false",
    "uuid_type": "must be an id like 3fa85f64-5717-4562-b3fc-2c963f66afa6",
    "uuid_parsing": "must be an id like 3fa85f64-5717-4562-b3fc-2c963f66afa6",
    "model_type": "must be a JSON object", "dict_type": "must be a JSON object",
    "model_attributes_type": "must be a JSON object",
    "json_invalid": "is not valid JSON",
    "literal_error": "is not one of the allowed values",
    "enum": "is not one of the allowed values",
}

_BOUNDS = {
    "greater_than_equal": ("ge", "must be at least {}"), "greater_than": ("gt", "must be more than {}"),
    "less_than_equal": ("le", "must be at most {}"), "less_than": ("lt", "must be less than {}"),
    "string_too_short": ("min_length", "must be at least {} characters long"),
    "string_too_long": ("max_length", "must be at most {} characters long"),
}

_PREFIXES = ("Value error, ", "Assertion failed, ")


def _number(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def plain_message(item: dict[str, Any]) -> str:
    """Return the plain-language message of one pydantic error item (needs its `ctx` for limits)."""
    kind, msg, ctx = item.get("type", ""), str(item.get("msg", "")), item.get("ctx") or {}
    if kind in _FIXED:
        return _FIXED[kind]
    if kind in _BOUNDS:
        name, text = _BOUNDS[kind]
        if kind == "string_too_short" and ctx.get(name) == 1:
            return "must not be empty"
        if name in ctx:
            return text.format(_number(ctx[name]))
    if kind == "value_error" and "email address" in msg:
        return "must be a valid email address"
    for prefix in _PREFIXES:
        if msg.startswith(prefix):
            msg = msg[len(prefix):]
    if msg.startswith("Input should be "):
        msg = "must be " + msg[len("Input should be "):]
    return msg


def field_label(loc: list[Any]) -> str:
    """Return the field a `loc` points at, in words ("" for the request as a whole)."""
    names = [str(part) for part in loc if part not in ("body", "query")]
    if not names:
        return ""
    last = names[-1]
    return _LABELS.get(last, last.replace("_", " ").capitalize())


def summary_message(details: list[dict[str, Any]]) -> str:
    """Return one line saying what to fix, e.g. "Quantity must be at least 1"."""
    parts = []
    for item in details[:5]:
        label = field_label(item.get("loc") or [])
        parts.append(f"{label} {item['msg']}" if label else item["msg"])
    return "; ".join(parts) or "the request is not valid"
