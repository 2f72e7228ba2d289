"""Running one parsed command the way every `erofs-passthrough` entry point does: an `EpError`
is one line on stderr and exit 1, Ctrl-C is 130, SIGTERM 143 after cleanup, a closed stdout
(`... | head`) ends quietly with 141. The root CLI and `python -m snapshotter.service.cli` both
use it, so the service started either way behaves the same."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

from snapshotter.errors import EpError


def _exit_on_sigterm(signum: int, frame: object) -> None:
    """SIGTERM ends a command the way an error does: `finally` blocks and cleanup handlers
    run (no temp file of `atomic_output` is left behind, an in-place `verity format` is
    undone), then the exit status is 143 as for a process killed by SIGTERM. A second SIGTERM
    during that cleanup is ignored; SIGKILL still stops everything."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise SystemExit(128 + signum)


def run_command(args: argparse.Namespace) -> int:
    """Run `args.func(args)` (an argparse subcommand) and turn its outcome into an exit code."""
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm) if in_main_thread else None
    try:
        return int(args.func(args) or 0)
    except EpError as exc:
        print(f"erofs-passthrough {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`... | head`): stop quietly, as other command-line tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
