"""The OpenAPI document: valid 3.1, generated from the models, covering every route, matching responses."""

from __future__ import annotations

from typing import Any

import jsonschema_rs
import schemathesis

from tests.integration.api_support import clock

pytest_plugins = ["tests.integration.api_support"]


def response_validator(doc: dict, method: str, path: str, status: int) -> Any:
    response = doc["paths"][path][method.lower()]["responses"][str(status)]
    schema = next(iter(response["content"].values()))["schema"]
    return jsonschema_rs.validator_for({**schema, "components": doc["components"]})


async def test_document_is_valid_openapi_3_1(api) -> None:
    doc = (await api.call("GET", "/openapi.json", expect=200)).body
    assert doc["openapi"] == "3.1.0"
    schema = schemathesis.openapi.from_dict(doc)
    schema.validate()  # against the OpenAPI 3.1 meta-schema
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == sum(len(item) for item in doc["paths"].values())
    for name, component in doc["components"]["schemas"].items():
        assert jsonschema_rs.meta.is_valid(component), name


async def test_document_covers_every_route_and_nothing_else(api) -> None:
    doc = (await api.call("GET", "/openapi.json", expect=200)).body
    documented = {(method.upper(), path) for path, item in doc["paths"].items() for method in item}
    served = {(route.method, route.resource.canonical) for route in api.app.router.routes()
              if route.method != "HEAD"}
    assert documented == served
    assert {p for _, p in served if p.startswith("/api/v1")} >= {
        "/api/v1/auth/register", "/api/v1/auth/login", "/api/v1/me", "/api/v1/broker/connect",
        "/api/v1/broker/session", "/api/v1/broker", "/api/v1/strategies", "/api/v1/strategies/{id}",
        "/api/v1/strategies/start", "/api/v1/strategies/stop", "/api/v1/strategies/{id}/status",
        "/api/v1/strategies/{id}/orders"}


async def test_schemas_come_from_the_pydantic_models(api) -> None:
    doc = (await api.call("GET", "/openapi.json", expect=200)).body
    schemas = doc["components"]["schemas"]
    create = schemas["StrategyCreateRequest"]
    assert create["additionalProperties"] is False
    assert create["properties"]["quantity"] == {"maximum": 100000, "minimum": 1, "title": "Quantity",
                                                "type": "integer"}
    assert create["properties"]["symbol"]["pattern"] == "^[A-Z0-9&_-]{1,30}$"
    assert schemas["BrokerConnectRequest"]["properties"]["api_secret"]["writeOnly"] is True
    login = doc["paths"]["/api/v1/auth/login"]["post"]
    assert login["security"] == [] and set(login["responses"]) >= {"200", "400", "401", "413", "422", "429"}
    assert doc["paths"]["/api/v1/me"]["get"]["security"] == [{"bearerAuth": []}]


async def test_real_responses_match_the_document(api) -> None:
    doc = (await api.call("GET", "/openapi.json", expect=200)).body
    user = await api.connected_user()
    strategy = await api.strategy(user, buy_time=clock(600), sell_time=clock(1200))
    sid = strategy["id"]
    checks = [
        ("GET", "/api/v1/me", None, 200),
        ("GET", "/api/v1/broker", None, 200),
        ("GET", "/api/v1/strategies", None, 200),
        ("GET", "/api/v1/strategies/{id}", None, 200),
        ("PATCH", "/api/v1/strategies/{id}", {"quantity": 2}, 200),
        ("POST", "/api/v1/strategies/start", {"strategy_id": sid}, 200),
        ("GET", "/api/v1/strategies/{id}/status", None, 200),
        ("GET", "/api/v1/strategies/{id}/orders", None, 200),
        ("POST", "/api/v1/strategies/stop", {"strategy_id": sid}, 200),
        ("POST", "/api/v1/strategies", {"symbol": "NOPE"}, 422),
        ("GET", "/api/v1/strategies/{id}", None, 401),
    ]
    for method, path, body, status in checks:
        reply = await api.call(method, path.replace("{id}", sid), body, user=user if status != 401 else None)
        assert reply.status == status, (method, path, reply.text)
        errors = list(response_validator(doc, method, path, status).iter_errors(reply.body))
        assert not errors, (method, path, [e.message for e in errors])
