"""The machine a benchmark ran on, as one line at the top of its report.

The same machine kind has run on hosts whose anchors' times differed by up to 2.2x while
ours moved by a few per cent (docs/benchmarks.md, issue 11's table): a figure means little
without the CPU, the kernel and the load it was measured under.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

__all__ = ["describe"]


def _cpu_model() -> str:
    """The first CPU's model name (and family/model numbers, which a generic name hides)."""
    fields: dict[str, str] = {}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown CPU"
    for line in text.splitlines():
        if not line.strip():
            break  # the first CPU's block only
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name", "unknown CPU")
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    return name


def describe() -> str:
    """e.g. `host: AMD EPYC (family 25, model 17), 2 CPUs, Linux 6.18.0; load 0.52 0.80 0.61`"""
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"host: {_cpu_model()}, {os.cpu_count()} CPUs, {platform.system()} "
        f"{platform.release()}; load {load}"
    )


if __name__ == "__main__":
    print(describe())
