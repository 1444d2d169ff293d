"""Convert every official ConvNeXt V2 checkpoint (or a subset), resumably, with a summary table at the end.

    python conversion_scripts/convert_all.py --dry-run                       # the plan, no network
    python conversion_scripts/convert_all.py --output-root converted --filter atto --filter 22k
    python conversion_scripts/convert_all.py --output-root converted --push-to-hub --namespace me

Finished output folders (``<output-root>/<repo name>``) are skipped, so an interrupted run picks up where it
stopped. A checkpoint that fails, for whatever reason, is reported and the run goes on to the next; the summary
table lists every checkpoint with its status and error, and the exit status is 1 when any failed (2 for a bad
command line, 130 or 143 when interrupted, after the table of what was done).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm

from convnextv2_hf.checkpoints import DEFAULT_HUB_NAMESPACE, parse_namespace, select_checkpoints
from convnextv2_hf.conversion import (
    ConversionInterrupted,
    convert_checkpoint,
    is_converted_folder,
    positive_int_argument,
    push_folder_to_hub,
)


def namespace_argument(text: str) -> str:
    """argparse type: a Hub user or organisation name, checked before any card or repository id is made from it."""
    try:
        return parse_namespace(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output-root", default="converted", help="one folder per checkpoint is created here")
    parser.add_argument("--filter", action="append", help="substring of the official name (size, 1k/22k, fcmae, 384)")
    parser.add_argument(
        "--namespace", type=namespace_argument, default=DEFAULT_HUB_NAMESPACE, help="Hub namespace of the repo ids"
    )
    parser.add_argument("--dry-run", action="store_true", help="print the plan only; touches neither network nor disk")
    parser.add_argument("--cache-dir", help="where official files are downloaded (default: torch.hub's cache)")
    parser.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument(
        "--verify-image-size", type=positive_int_argument, help="side of the verification input (default: resolution)"
    )
    parser.add_argument("--push-to-hub", action="store_true")
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--revision")
    parser.add_argument("--endpoint", help="Hub endpoint (default: HF_ENDPOINT, else huggingface.co)")
    return parser.parse_args(argv)


def print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]
    for row in [header, ["-" * width for width in widths], *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def _one_line(error: BaseException, limit: int = 100) -> str:
    text = " ".join(f"{type(error).__name__}: {error}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    checkpoints = select_checkpoints(args.filter)
    if not checkpoints:
        print(f"error: no official checkpoint matches --filter {args.filter}", file=sys.stderr)
        return 2
    root = Path(args.output_root)
    if root.exists() and not root.is_dir():
        print(f"error: --output-root {root} is an existing file, not a folder", file=sys.stderr)
        return 2
    if args.dry_run:
        print(f"plan: {len(checkpoints)} checkpoint(s) into {root}/")
        print_table(
            ["source URL", "", "repo id", "model card title"],
            [[c.url, "->", c.repo_id(args.namespace), c.title] for c in checkpoints],
        )
        return 0

    summary, interrupted = [], None
    for checkpoint in tqdm(checkpoints, desc="converting", unit="checkpoint"):
        output_dir, repo_id = root / checkpoint.repo_name, checkpoint.repo_id(args.namespace)
        started, difference, error_text = time.perf_counter(), "", ""
        try:
            if is_converted_folder(output_dir):
                status = "skipped (done)"
            else:
                report = convert_checkpoint(
                    checkpoint.name,
                    output_dir,
                    verify=args.verify,
                    verify_image_size=args.verify_image_size,
                    repo_id=repo_id,
                    cache_dir=args.cache_dir,
                    log=tqdm.write,
                )
                status = "converted"
                difference = f"{report.verification.max_abs_diff:.1e}" if report.verification else "not verified"
        except KeyboardInterrupt as interrupt:  # stop, but still say what was done
            interrupted, status, error_text = interrupt, "INTERRUPTED", _one_line(interrupt)
        except Exception as error:  # any failure of one checkpoint: report it, go on to the next
            status, error_text = "FAILED", _one_line(error)
            tqdm.write(f"{checkpoint.name}: FAILED: {type(error).__name__}: {error}")
        if args.push_to_hub and not interrupted and status != "FAILED":
            try:
                push_folder_to_hub(
                    output_dir, repo_id, endpoint=args.endpoint, private=args.private, revision=args.revision
                )
                status += ", pushed"
            except KeyboardInterrupt as interrupt:
                interrupted, status, error_text = interrupt, "INTERRUPTED (push)", _one_line(interrupt)
            except Exception as error:  # keep going: the folder stays for a later run
                status, error_text = "FAILED (push)", _one_line(error)
                tqdm.write(f"{checkpoint.name}: push to {repo_id} failed: {error}")
        summary.append(
            [checkpoint.name, status, difference, f"{time.perf_counter() - started:.1f}s", repo_id, error_text]
        )
        if interrupted is not None:
            break

    print()
    print_table(["checkpoint", "status", "max abs diff", "time", "repo id", "error"], summary)
    failed = [row for row in summary if row[1].startswith(("FAILED", "INTERRUPTED"))]
    not_started = len(checkpoints) - len(summary)
    print(
        f"{len(summary) - len(failed)} done, {len(failed)} failed"
        + (f", {not_started} not started (interrupted)" if not_started else "")
    )
    if interrupted is not None:
        return 128 + (interrupted.signum if isinstance(interrupted, ConversionInterrupted) else 2)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
