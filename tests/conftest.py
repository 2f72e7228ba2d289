"""Shared test plumbing.

Tests that need root, loop devices, QEMU or containerd skip elsewhere with a printed reason.
With EROFS_PASSTHROUGH_STRICT=1 (set by .ci/run) every such skip becomes a failure, so CI can
never turn green by skipping the tests that matter.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import settings

# The shared TCG guest (session scope) and its cleanliness check, for every guest test module.
from tests.support.guest_fixtures import (  # noqa: F401
    agent,
    attacher,
    clean_guest,
    guest_image,
    guest_key,
    vm,
)

STRICT = os.environ.get("EROFS_PASSTHROUGH_STRICT") == "1"

# Property tests draw the same examples on every CI run (a failure reproduces anywhere);
# longer randomised runs are `make fuzz`. Elsewhere hypothesis explores as it likes.
settings.register_profile("ci", derandomize=True, database=None)
if STRICT:
    settings.load_profile("ci")

# A test's tier is the directory it lives in; `-m unit`, `-m "not vm"` select by it.
TIERS = ("unit", "kernel", "containerd", "vm")


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent
    for item in items:
        tier = item.path.relative_to(here).parts[0] if item.path.is_relative_to(here) else ""
        if tier in TIERS:
            item.add_marker(tier)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if STRICT and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skip not allowed with EROFS_PASSTHROUGH_STRICT=1: {reason}"
