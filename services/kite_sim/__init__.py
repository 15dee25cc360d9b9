"""Kite Connect v3 simulator (paper broker), wire-compatible with the official client.

Run `python -m services.kite_sim --port N`, then point
`KiteConnect(api_key, access_token=..., root="http://127.0.0.1:N")` and
`KiteTicker(api_key, access_token, root="ws://127.0.0.1:N/ws")` at it.
Credentials come from the loopback-only admin API (`POST /sim/accounts`).
In-process use: `services.kite_sim.app.start_sim(host, port, **settings)`.
`--state-file` keeps paper accounts across restarts; `--upstream-*` takes live
prices from a real Kite ticker (see docs/paper_broker.md).
"""
