"""The ``wavechain`` command line. Only ``main()`` reads the environment."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import structlog
from aiohttp import web

from service.logging import configure_logging

log = structlog.get_logger("wavechain.cli")


def _fault(text: str) -> tuple[str, Any]:
    name, sep, raw = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw  # a bare string, e.g. failure_error=oops
    return name.strip(), value


def _add_emulator(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "emulator",
        help="run the offline WaveSpeed / AI/ML API emulator",
        description="An offline stand-in for api.wavespeed.ai and api.aimlapi.com.",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8900)
    p.add_argument("--latency", type=float, help="seconds from submit to a terminal status")
    p.add_argument(
        "--webhook-secret",
        help="whsec_… secret to sign webhooks with (default: $EMULATOR_WEBHOOK_SECRET or random)",
    )
    p.add_argument(
        "--fault",
        type=_fault,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="set a fault, e.g. failure_rate=0.2, drop_rate=0.5, submit_error_status=503; "
        "see GET /_emulator/faults for every name",
    )


def _run_emulator(args: argparse.Namespace, env: dict[str, str]) -> int:
    from emulator.app import create_emulator_app
    from emulator.faults import FaultError, Faults

    changes = dict(args.fault)
    if args.latency is not None:
        changes["latency_s"] = args.latency
    try:
        faults = Faults().updated(changes)
    except FaultError as exc:
        print(f"wavechain emulator: {exc}", file=sys.stderr)
        return 2
    secret = args.webhook_secret or env.get("EMULATOR_WEBHOOK_SECRET")
    app = create_emulator_app(faults, webhook_secret=secret)
    log.info("emulator.starting", host=args.host, port=args.port, faults=changes)
    web.run_app(app, host=args.host, port=args.port, print=None, access_log=None)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wavechain", description=__doc__)
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--log-json", action="store_true", default=None)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_emulator(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    env = dict(os.environ)
    configure_logging(json=args.log_json, level=args.log_level)
    if args.command == "emulator":
        return _run_emulator(args, env)
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
