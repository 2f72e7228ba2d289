"""Shared test plumbing.

Tests that need root, loop devices, QEMU or containerd skip elsewhere with a printed reason.
With EROFS_PASSTHROUGH_STRICT=1 (set by .ci/run) every such skip becomes a failure, so CI can
never turn green by skipping the tests that matter.
"""

from __future__ import annotations

import os

import pytest

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


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if STRICT and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skip not allowed with EROFS_PASSTHROUGH_STRICT=1: {reason}"
