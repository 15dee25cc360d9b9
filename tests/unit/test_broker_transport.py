"""The asyncio Kite client reads replies and classifies failures as the official client would."""

from __future__ import annotations

import aiohttp
import orjson
import pytest
from kiteconnect import exceptions as kex

from libs.broker.kite import BrokerErrorKind, classify
from libs.broker.kite_rest import encode_form, parse_reply


def test_form_is_encoded_like_requests_encodes_a_dict() -> None:
    from requests.models import RequestEncodingMixin

    form = {"variety": "regular", "tradingsymbol": "M&M", "quantity": 3, "tag": "TWE A", "market_protection": -1}
    assert encode_form(form).decode() == RequestEncodingMixin._encode_params(form)


def test_error_envelope_raises_the_class_kite_names_with_the_http_status() -> None:
    body = orjson.dumps({"status": "error", "error_type": "OrderException", "message": "no margin", "data": None})
    with pytest.raises(kex.OrderException) as raised:
        parse_reply(400, "application/json", body)
    assert raised.value.code == 400 and str(raised.value) == "no margin"


def test_unknown_error_type_is_a_general_exception() -> None:
    body = orjson.dumps({"status": "error", "error_type": "Nope", "message": "?"})
    with pytest.raises(kex.GeneralException):
        parse_reply(502, "application/json", body)


@pytest.mark.parametrize("content_type,body", [("application/json", b"{not json"), ("text/html", b"<html>")])
def test_unreadable_reply_is_a_data_exception(content_type: str, body: bytes) -> None:
    with pytest.raises(kex.DataException):
        parse_reply(200, content_type, body)


def test_success_returns_data() -> None:
    assert parse_reply(200, "application/json; charset=utf-8", b'{"status":"success","data":{"order_id":"1"}}') \
        == {"order_id": "1"}


@pytest.mark.parametrize("exc", [TimeoutError(), aiohttp.ServerTimeoutError(), aiohttp.ServerDisconnectedError(),
                                 aiohttp.ClientOSError(104, "reset")])
def test_transport_failures_after_sending_an_order_are_ambiguous(exc: Exception) -> None:
    assert classify(exc, sent_order=True).kind == BrokerErrorKind.AMBIGUOUS
    assert classify(exc, sent_order=False).kind == BrokerErrorKind.RETRYABLE
