"""Regenerate the committed model cards (``model_cards/<repo name>.md``) of the 26 official checkpoints from
the package's ``convnextv2_hf/model_card_template.md`` and the checkpoint table.

    python conversion_scripts/generate_model_cards.py [--output-dir model_cards] [--namespace convnextv2-hf]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from convnextv2_hf.checkpoints import DEFAULT_HUB_NAMESPACE, parse_namespace
from convnextv2_hf.model_card import write_model_cards


def namespace_argument(text: str) -> str:
    """argparse type: a Hub user or organisation name, checked before any card or repository id is made from it."""
    try:
        return parse_namespace(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output-dir", default=str(Path(__file__).resolve().parents[1] / "model_cards"))
    parser.add_argument("--namespace", type=namespace_argument, default=DEFAULT_HUB_NAMESPACE)
    args = parser.parse_args(argv)
    try:
        paths = write_model_cards(args.output_dir, args.namespace)
    except OSError as error:  # a file in the way, a read-only folder, a full disk
        print(f"error: could not write the model cards into {args.output_dir}: {error}", file=sys.stderr)
        return 2
    print(f"wrote {len(paths)} model cards into {args.output_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
