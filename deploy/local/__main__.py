"""`python -m deploy.local up|down|status`: the local stack behind make up / make down."""

from __future__ import annotations

import argparse
import sys

from deploy.local.stack import LocalStack


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.local")
    parser.add_argument("command", choices=["up", "down", "status"])
    args = parser.parse_args(argv)
    stack = LocalStack()
    if args.command == "up":
        try:
            env = stack.up()
        except Exception as exc:  # noqa: BLE001 - one readable line for the user, not a trace
            print(f"tickwise: up failed: {exc}", file=sys.stderr)
            return 1
        print(f"tickwise: stack is up; environment in {stack.run_dir / 'stack.env'}")
        for key in ("API_URL", "SIM_URL", "REDIS_URL", "DATABASE_URL"):
            if key in env:
                print(f"  {key}={env[key]}")
    elif args.command == "down":
        stack.down()
    else:
        for name, state in stack.status().items():
            print(f"{name:<16} {state}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
