"""`python -m deploy.local up|down|status|clean`: the local stack behind make up / down / status / clean."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from deploy.local.stack import LocalStack


def _duration(seconds: int) -> str:
    return time.strftime("%H:%M:%S", time.gmtime(seconds)) if seconds else "-"


def print_status(stack: LocalStack) -> None:
    """One line per process, then the URLs a user needs."""
    rows = stack.status()
    if not rows:
        print("tickwise: no stack in .run/ yet: run `make up`")
        return
    print(f"{'process':<20} {'state':<9} {'pid':>7} {'port':>6} {'uptime':>9} {'restarts':>8}")
    for name, row in rows.items():
        print(f"{name:<20} {row['state']:<9} {row['pid'] or '-':>7} {row['port'] or '-':>6} "
              f"{_duration(row['uptime_s']):>9} {row['restarts']:>8}")
    env = stack.stack_env()
    print()
    for key, label in (("API_URL", "dashboard and API"), ("SIM_URL", "paper broker (Kite simulator)")):
        if key in env:
            print(f"  {label:<30} {env[key]}")
    print(f"  {'environment (source it)':<30} {stack.run_dir / 'stack.env'}")
    print(f"  {'logs':<30} {stack.logs}/")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.local")
    parser.add_argument("command", choices=["up", "down", "status", "clean"])
    args = parser.parse_args(argv)
    run_dir = os.environ.get("TICKWISE_RUN_DIR")
    stack = LocalStack(Path(run_dir) if run_dir else None)
    try:
        if args.command == "up":
            env = stack.up()
            print(f"tickwise: stack is up; environment in {stack.run_dir / 'stack.env'}")
            for key in ("API_URL", "SIM_URL"):
                if key in env:
                    print(f"  {key}={env[key]}")
            print("  `make status` shows every process; `make down` stops them all")
        elif args.command == "down":
            stack.down()
        elif args.command == "clean":
            stack.clean()
        else:
            print_status(stack)
    except KeyboardInterrupt:
        print("tickwise: interrupted", file=sys.stderr)
        return 130
    except (Exception, subprocess.SubprocessError) as exc:  # noqa: BLE001 - one readable line for the user, not a trace
        print(f"tickwise: {args.command} failed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
