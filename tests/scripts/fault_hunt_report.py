"""Run the fault-hunt catalogue (tests/test_fault_hunt.py) and print what happens to each bad input, counted per area
and outcome, as a Markdown table for the issue's closing note.

    python tests/scripts/fault_hunt_report.py              # the table, then every case that is not handled well
    python tests/scripts/fault_hunt_report.py --verbose    # also one line per case
    python tests/scripts/fault_hunt_report.py --area conversion

Each case runs in a fresh temporary folder (also the working directory), offline. Outcomes are those of
``classify``: clear error, correct behaviour, unclear error, silent wrong result, partial output. Cases left to a
dependency (torch, transformers, safetensors, ...) are counted in their own rows, with what the package does about
them; cases mishandled in files that are being changed by others are listed with the fix they need.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the catalogue and its conftest helpers

import test_fault_hunt as hunt  # noqa: E402


def quiet_libraries() -> None:
    """Load reports and progress bars of the cases would bury the table."""
    import datasets
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()


def run(cases: list[hunt.Case]) -> list[tuple[hunt.Case, hunt.Result, float]]:
    results = []
    for case in cases:
        started = time.perf_counter()
        output = io.StringIO()
        with tempfile.TemporaryDirectory(prefix="fault-hunt-") as folder:
            with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
                result = hunt.classify(case, Path(folder))
        results.append((case, result, time.perf_counter() - started))
    return results


def markdown_table(header: list[str], rows: list[list]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]
    lines = [header, ["-" * width for width in widths], *rows]
    cells = ([str(cell).ljust(width) for cell, width in zip(line, widths, strict=True)] for line in lines)
    return "\n".join("| " + " | ".join(line) + " |" for line in cells)


def counts_table(results) -> str:
    rows = []
    for area in hunt.AREAS:
        for dependency in (False, True):
            chosen = [r for c, r, _ in results if c.area == area and bool(c.dependency) == dependency]
            if not chosen:
                continue
            counts = Counter(result.outcome for result in chosen)
            label = f"{area} (left to a dependency)" if dependency else area
            rows.append([label, *(counts.get(outcome, 0) for outcome in hunt.OUTCOMES), len(chosen)])
    totals = Counter(result.outcome for _, result, _ in results)
    rows.append(["**all**", *(totals.get(outcome, 0) for outcome in hunt.OUTCOMES), len(results)])
    return markdown_table(["area", *hunt.OUTCOMES, "cases"], rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--area", choices=hunt.AREAS, help="only this area")
    parser.add_argument("--verbose", action="store_true", help="one line per case")
    args = parser.parse_args(argv)
    quiet_libraries()
    cases = [case for case in hunt.CASES if args.area in (None, case.area)]
    started = time.perf_counter()
    results = run(cases)
    good = ("clear error", "correct behaviour")

    print(f"Fault hunt: {len(results)} cases in {time.perf_counter() - started:.0f} s\n")
    print(counts_table(results))
    if args.verbose:
        print("\nEvery case:")
        for case, result, seconds in results:
            print(f"- {case.id}: {result.outcome} ({seconds:.2f} s) {hunt._one_line(result.detail, 160)}")
    others = [(c, r) for c, r, _ in results if r.outcome not in good and not c.dependency]
    if others:
        print("\nMishandled in the package's own code (each an xfail in the catalogue, with the fix it needs):")
        for case, result in others:
            print(f"- {case.id}: {result.outcome}. {case.xfail or 'NOT MARKED: ' + result.detail}")
    dependencies = [(c, r) for c, r, _ in results if c.dependency]
    if dependencies:
        print("\nLeft to a dependency (outcome today; what the package does about it):")
        for case, result in dependencies:
            print(f"- {case.id}: {result.outcome}. {case.dependency}")
    unexpected = [(c, r) for c, r, _ in results if r.outcome != c.expected]
    unmarked = [(c, r) for c, r in unexpected if not c.xfail]
    fixed = [c for c, r, _ in results if c.xfail and r.outcome == c.expected]
    for case in fixed:
        print(f"\nFIXED since marked: {case.id} is now '{case.expected}': remove its xfail")
    for case, result in unmarked:
        print(f"\nUNEXPECTED: {case.id}: {result.outcome}, expected {case.expected}: {result.detail}")
    return 1 if unmarked else 0


if __name__ == "__main__":
    raise SystemExit(main())
