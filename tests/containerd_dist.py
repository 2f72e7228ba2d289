"""containerd binaries for the tests: 1.6 from the system (bookworm), 1.7 and 2.x from Debian's
trixie and sid suites (shim_integration.containerd_dist: downloaded once, cached by version).

    python -m tests.containerd_dist trixie sid     # prefetch (what CI's first test run does)
"""

from __future__ import annotations

import sys

from shim_integration.containerd_dist import from_suite
from shim_integration.containerd_private import Dist, system_dist

__all__ = ["Dist", "from_suite", "system"]


def system() -> Dist:
    """Debian bookworm's containerd (installed by .ci/setup)."""
    return system_dist()


if __name__ == "__main__":
    for suite in sys.argv[1:] or ["trixie", "sid"]:
        print(suite, from_suite(suite))
