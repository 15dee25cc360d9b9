"""Tickwise HTTP API (`python -m services.api`): the only door users come in by.

Contract:
- JSON under /api/v1 (accounts, broker credentials, strategies, start/stop,
  status, order log), described by /openapi.json (OpenAPI 3.1, generated from
  the `libs.schema` models); /healthz, /readyz (Redis and Postgres), /metrics
  and a small dashboard at / share the one port (TICKWISE_HEALTH_PORT, else
  TICKWISE_API_PORT).
- Every error is `{"error": {"code", "message", "details"}}` with a 4xx
  status (503 when a dependency is down); nothing a client sends yields a 500.
- Broker secrets are AES-256-GCM at rest (TICKWISE_SECRET_KEY, required
  outside dev mode; retired keys decrypt and are rotated on read) and are
  never returned or logged.
- Start/stop keep Postgres and Redis in step: a run is either fully loaded
  (libs.trading.runs.load_run) with status running, or not at all.
- Users see only their own resources; anything else is 404.
"""
