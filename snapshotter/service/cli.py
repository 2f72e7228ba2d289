"""`erofs-passthrough serve` (the containerd snapshotter and differ service) and `status`.

Exit codes of `serve`: 0 after a clean stop, 2 for a configuration error (systemd's unit does not
restart on it), 1 for anything else the host lacks (preflight) or a failed start.
`status` exits 0 when every service answers SERVING, 1 otherwise or when nothing listens.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import textwrap
from pathlib import Path

from snapshotter.command import run_command
from snapshotter.errors import Unavailable
from snapshotter.service import logfmt
from snapshotter.service.serve_config import (
    LOG_LEVELS,
    ConfigError,
    ServeConfig,
    keys_help,
    load_config,
)

log = logging.getLogger("snapshotter.service.preflight")
CONFIG_EXIT = 2
STATUS_TIMEOUT = 5.0


def register(subparsers: argparse._SubParsersAction) -> None:
    defaults = ServeConfig()
    p = subparsers.add_parser(
        "serve",
        help="serve containerd's Snapshots and Diff APIs on a unix socket (proxy plugin)",
        description=textwrap.fill(
            'Serve containerd\'s Snapshots API (proxy plugin type "snapshot") and Diff API '
            '(type "diff", containerd >= 1.7: Apply converts layers straight to EROFS) on '
            "one unix socket, with gRPC health checking. Checks root, the kernel's erofs, "
            "loop devices and device-mapper first. Exit 2 on a configuration error, 1 when the "
            "host lacks something the service needs.",
            78,
        ),
        epilog=keys_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--root", type=Path, help=f"state directory (default {defaults.root})")
    p.add_argument(
        "--address",
        type=Path,
        help=f"unix socket to listen on, mode 0600 (default {defaults.address})",
    )
    p.add_argument(
        "--containerd-address",
        type=Path,
        help="containerd's socket, for the differ's content reads "
        f"(default {defaults.containerd_address})",
    )
    p.add_argument("--config", type=Path, help="TOML file with the keys below")
    p.add_argument("--log-level", choices=LOG_LEVELS, help="default info")
    p.set_defaults(func=_serve)

    s = subparsers.add_parser(
        "status",
        help="ask a running serve's health service whether it is serving",
        description="Probe the gRPC health service of a running `serve`: one line per service, "
        "SERVING or NOT_SERVING. Exit 0 when all are SERVING, else 1.",
    )
    s.add_argument(
        "--address",
        type=Path,
        help=f"the service's socket (default: the config's, else {defaults.address})",
    )
    s.add_argument("--config", type=Path, help="take the socket from this serve config file")
    s.add_argument("--json", action="store_true", help="one JSON object: service -> status")
    s.set_defaults(func=_status)


def _serve(args: argparse.Namespace) -> int:
    from snapshotter.service.preflight import preflight

    try:
        config = load_config(
            args.config,
            root=args.root,
            address=args.address,
            containerd_address=args.containerd_address,
            log_level=args.log_level,
        )
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"erofs-passthrough serve: {problem}", file=sys.stderr)
        return CONFIG_EXIT
    logfmt.setup(config.log_level)
    findings = preflight(config)
    for finding in findings:
        if not finding.fatal:
            log.warning(finding.message, extra={"check": "preflight"})
    fatal = [f.message for f in findings if f.fatal]
    if fatal:
        for message in fatal:
            print(f"erofs-passthrough serve: {message}", file=sys.stderr)
        return 1

    from snapshotter.service.grpc_errors import describe_os_error
    from snapshotter.service.serve import Server

    try:
        Server(config).run()
    except OSError as exc:  # the host refused something at start (permissions, space, a path)
        print(f"erofs-passthrough serve: {describe_os_error(exc, config.root)}", file=sys.stderr)
        return 1
    return 0


def probe(address: Path, timeout: float = STATUS_TIMEOUT) -> dict[str, str]:
    """Each health service name ("" is the server as a whole) -> SERVING, NOT_SERVING, ..."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from snapshotter.service.serve import SERVICE_NAMES

    try:
        address.stat()
    except FileNotFoundError:
        raise Unavailable(f"nothing listens on {address}: no such socket") from None
    except OSError as exc:  # e.g. not root: /run/erofs-passthrough is 0700
        raise Unavailable(f"cannot reach {address}: {exc.strerror}") from None
    status: dict[str, str] = {}
    with grpc.insecure_channel(f"unix:{address}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for name in ("", *SERVICE_NAMES):
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=timeout)
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.NOT_FOUND:
                    status[name] = "SERVICE_UNKNOWN"
                    continue
                if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    reason = (exc.details() or "").rsplit("error: ", 1)[-1].lower()
                    raise Unavailable(f"nothing answers on {address}: {reason}") from None
                raise Unavailable(
                    f"health check on {address}: {exc.code().name}: {exc.details()}"
                ) from None
            status[name] = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return status


def _status(args: argparse.Namespace) -> int:
    address = args.address
    if address is None:
        try:
            address = load_config(args.config).address
        except ConfigError as exc:
            for problem in exc.problems:
                print(f"erofs-passthrough status: {problem}", file=sys.stderr)
            return CONFIG_EXIT
    status = probe(address)
    if args.json:
        print(json.dumps({"address": str(address), "services": status}))
    else:
        for name, state in status.items():
            print(f"{name or '(server)'}\t{state}")
    return 0 if all(s == "SERVING" for s in status.values()) else 1


def main(argv: list[str] | None = None) -> int:
    """`python -m snapshotter.service.cli serve ...`: the service without the other commands."""
    parser = argparse.ArgumentParser(prog="erofs-passthrough")
    register(parser.add_subparsers(dest="command", required=True))
    return run_command(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
