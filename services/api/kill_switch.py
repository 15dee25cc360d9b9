"""The per-user kill switch: stop every running strategy, optionally square off every held position.

Each strategy goes through the same `stop_run` as `POST /strategies/stop`
(its executor lock, the position state machine, the shared exit tag), so a
held position gets exactly one exit at the broker however often the switch is
pressed or whatever order is in flight: a press waits for an order in flight
(up to `kill_switch_lock_wait_s`), and an exit already queued or sent shares
its tag with the square-off, so only one can fill. A second press finds
nothing running and changes nothing. Repeating strategies between two runs are
marked `stopped` first, so the scheduler does not arm their next run.
"""

from __future__ import annotations

import structlog
from aiohttp import web
from sqlalchemy import select

from libs.schema.models import KillSwitchOut, KillSwitchRequest, KillSwitchResult, Position, StrategyStatus
from libs.schema.tables import Strategy
from libs.trading.repeat import end_series
from services.api.deps import READS, REDIS, SESSIONS, SETTINGS, current_user, read_model
from services.api.errors import ApiError, json_response
from services.api.notify import kill_switch_used
from services.api.run_control import stop_run
from services.api.status import build_status

log = structlog.get_logger("api")


async def press(request: web.Request) -> web.Response:
    """Stop all the caller's running strategies (square off held positions if asked); per-strategy summary."""
    app = request.app
    user_id = current_user(request)
    body = await read_model(request, KillSwitchRequest)
    async with app[SESSIONS]() as session:
        # First the repeating strategies between runs, so that none is re-armed behind our back.
        between = await end_series(session, user_id)
    async with app[READS]() as session:
        rows = (await session.scalars(select(Strategy).where(Strategy.user_id == user_id,
                                                             (Strategy.status == StrategyStatus.running)
                                                             | Strategy.id.in_(between))
                                      .order_by(Strategy.created_at, Strategy.id))).all()
    results: list[KillSwitchResult] = []
    for row in rows:
        action = "stopped"
        try:
            row, squared = await stop_run(app, user_id, row.id, body.square_off,
                                          app[SETTINGS].kill_switch_lock_wait_s)
        except ApiError as exc:
            if exc.code == "not_found":
                continue  # deleted meanwhile (it was not running, then): nothing to stop
            if exc.code != "strategy_busy":
                raise
            action = "busy"
        else:
            if squared:
                action = "squaring_off"
            elif row.status != StrategyStatus.stopped:
                action = "unchanged"  # it ended (or was stopped) while we waited
        status = await build_status(app, row)
        results.append(KillSwitchResult(strategy_id=row.id, symbol=row.symbol, status=row.status,
                                        position=Position(status["position"]), action=action))
    out = KillSwitchOut(strategies=results, stopped=sum(r.action in ("stopped", "squaring_off") for r in results),
                        squaring_off=sum(r.action == "squaring_off" for r in results))
    log.warning("kill switch pressed", user_id=str(user_id), square_off=body.square_off, running=len(rows),
                series_ended=len(between),
                stopped=out.stopped, squaring_off=out.squaring_off,
                busy=sum(r.action == "busy" for r in results))
    await kill_switch_used(app[REDIS], user_id, {"square_off": body.square_off, "stopped": out.stopped,
                                                 "squaring_off": out.squaring_off})
    return json_response(out.model_dump(mode="json"))
