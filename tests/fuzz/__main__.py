"""`make fuzz`: the fuzz targets (tests/fuzz/targets.py) for minutes instead of seconds.

    FUZZ_SECONDS=300 .venv/bin/python -m tests.fuzz [TARGET ...]

Rounds of Hypothesis examples with fixed seeds (FUZZ_SEED, then +1 per round) go to each
target in turn until FUZZ_SECONDS have passed, the whole process under a memory limit
(FUZZ_MEMORY_MB of address space: memory that grows with a declared size ends in MemoryError)
and every example under a time limit (FUZZ_EXAMPLE_SECONDS: a hang ends in `Hang`). Anything
a target raises is a finding: Hypothesis shrinks it, the smallest damage is saved in
tests/fuzz/examples/ (commit it with the fix: the test suite replays every file there) and the
run goes on with the next round. Exit status 1 when anything was found.
"""

from __future__ import annotations

import os
import resource
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

from hypothesis import HealthCheck, given, seed, settings

from tests.fuzz.targets import TARGETS, Damage, Target, apply, damages, save_example, time_limit


def _env(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def _where(exc: BaseException) -> str:
    frame = traceback.extract_tb(exc.__traceback__)[-1]
    return f"{type(exc).__name__}: {exc} (at {Path(frame.filename).name}:{frame.lineno})"


def run_round(
    target: Target,
    round_seed: int,
    work: Path,
    deadline: float,
    examples: int,
    example_seconds: int,
) -> tuple[int, str | None]:
    """One Hypothesis run of `examples` examples; (examples run, finding or None)."""
    work.mkdir(parents=True, exist_ok=True)
    base = target.base(work)
    spots = target.hot_spots(base, work)
    ran = 0
    failure: list[tuple[Damage, str]] = []
    case_dir = work / "case"

    @seed(round_seed)
    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        print_blob=False,
        suppress_health_check=list(HealthCheck),
    )
    @given(damage=damages(spots, len(base), target.first))
    def case(damage: Damage) -> None:
        nonlocal ran
        if time.monotonic() > deadline and not failure:
            return
        ran += 1
        shutil.rmtree(case_dir, ignore_errors=True)
        case_dir.mkdir()
        try:
            with time_limit(example_seconds):
                target.run(apply(base, damage), case_dir)
        except Exception as exc:  # MemoryError and the Hang included
            # the last failure is the shrunk one; its text is kept free of this run's paths
            failure[:] = [(damage, _where(exc).replace(f"{case_dir}/", "<case>/"))]
            raise

    try:
        case()
    except Exception:
        if not failure:
            raise
        damage, error = failure[0]
        path = save_example(target.name, damage, error)
        return ran, f"{target.name}: {error}\n  saved as {path}"
    return ran, None


def main(argv: list[str]) -> int:
    names = argv or list(TARGETS)
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        print(f"fuzz: unknown targets {unknown}; known: {', '.join(TARGETS)}", file=sys.stderr)
        return 2
    seconds = _env("FUZZ_SECONDS", 300)
    base_seed = _env("FUZZ_SEED", 20261201)
    memory = _env("FUZZ_MEMORY_MB", 3072) << 20
    example_seconds = _env("FUZZ_EXAMPLE_SECONDS", 20)
    examples = _env("FUZZ_ROUND_EXAMPLES", 200)
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    deadline = time.monotonic() + seconds
    findings: list[str] = []
    totals = dict.fromkeys(names, 0)
    work = Path(tempfile.mkdtemp(prefix="erofs-fuzz-"))
    try:
        round_no = 0
        while time.monotonic() < deadline:
            for name in names:
                if time.monotonic() >= deadline:
                    break
                ran, finding = run_round(
                    TARGETS[name],
                    base_seed + round_no,
                    work / name,
                    deadline,
                    examples,
                    example_seconds,
                )
                totals[name] += ran
                if finding:
                    findings.append(finding)
                    print(f"fuzz: FOUND {finding}", flush=True)
            round_no += 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary = ", ".join(f"{n} {c}" for n, c in totals.items())
    print(
        f"fuzz: {sum(totals.values())} examples in {seconds} s ({summary}); "
        f"{len(findings)} findings"
    )
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
