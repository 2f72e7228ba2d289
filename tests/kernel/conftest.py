"""Fixtures the kernel tier's modules share."""

from __future__ import annotations

import pytest

from tests.support.erofs_utils_oracle import ErofsUtils, OracleUnavailable, erofs_utils


@pytest.fixture(scope="module")
def oracle() -> ErofsUtils:
    """erofs-utils 1.8, built from Debian's source and cached; a skip, with the reason, where
    it cannot be built (STRICT turns skips into failures)."""
    try:
        return erofs_utils()
    except OracleUnavailable as exc:
        pytest.skip(str(exc))
