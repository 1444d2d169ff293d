"""Convert one official ConvNeXt V2 checkpoint into a Hugging Face folder, verify it against timm, optionally push.

    # an official file by name (downloaded once into torch.hub's cache), a URL, or a local file
    python conversion_scripts/convert_convnextv2_to_hf.py --checkpoint convnextv2_atto_1k_224_ema --output-dir out/atto
    python conversion_scripts/convert_convnextv2_to_hf.py --checkpoint checkpoint-799.pth --output-dir out/fcmae \\
        --model-name convnextv2_atto
    # and push (HF_TOKEN and HF_ENDPOINT are honoured)
    python conversion_scripts/convert_convnextv2_to_hf.py --checkpoint convnextv2_atto_1k_224_ema \\
        --output-dir out/atto --push-to-hub --repo-id me/convnextv2-atto-1k-224 [--private] [--revision main]

Reads the three official layouts: fine-tuned classifiers (-> ConvNextV2ForImageClassification with ImageNet-1K
labels), FCMAE encoders (-> ConvNextV2Model) and checkpoints of the official pretraining code, MinkowskiEngine
encoder plus decoder (-> ConvNextV2ForMaskedImageModeling). Any problem prints ``error: <message>``, exits 2 and
writes no folder; Ctrl-C or SIGTERM exits 130 or 143 and leaves no ``.partial`` folder. ``--sha256`` checks the
file against a known hash first; the output folder records the source's SHA-256 either way. ``--overwrite``
replaces only a folder that an earlier conversion wrote.
"""

from __future__ import annotations

import argparse
import sys

from convnextv2_hf.checkpoints import find_official_checkpoint, parse_repo_id
from convnextv2_hf.conversion import (
    ConversionInterrupted,
    convert_checkpoint,
    parse_sha256,
    positive_int_argument,
    push_folder_to_hub,
)


def sha256_argument(text: str) -> str:
    """argparse type: 64 hexadecimal digits."""
    try:
        return parse_sha256(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def repo_id_argument(text: str) -> str:
    """argparse type: a repository id the Hub accepts (checked before anything is converted)."""
    try:
        return parse_repo_id(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def fail(message: str) -> int:
    """The argparse convention for a failed command: ``error: <message>`` on stderr, exit status 2."""
    print(f"error: {message}", file=sys.stderr)
    return 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="local file, official URL or official name")
    parser.add_argument("--output-dir", required=True, help="folder to create (written atomically)")
    parser.add_argument(
        "--model-name",
        help="convnextv2_<size>, <size>, 'custom' or an official name; default: from the file name, else the shapes",
    )
    parser.add_argument(
        "--resolution", type=positive_int_argument, help="image size of the checkpoint (default: from the name, or 224)"
    )
    parser.add_argument(
        "--verify",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="compare with timm's ConvNeXt V2 before writing (default: on)",
    )
    parser.add_argument(
        "--verify-image-size", type=positive_int_argument, help="side of the verification input (default: resolution)"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an output folder that an earlier conversion wrote"
    )
    parser.add_argument(
        "--sha256", type=sha256_argument, help="expected SHA-256 of the checkpoint file (checked first)"
    )
    parser.add_argument("--cache-dir", help="where official files are downloaded (default: torch.hub's cache)")
    parser.add_argument("--push-to-hub", action="store_true")
    parser.add_argument(
        "--repo-id", type=repo_id_argument, help="Hub repository (default for official files: the table's suggestion)"
    )
    parser.add_argument("--private", action="store_true", help="create the repository private")
    parser.add_argument("--revision", help="branch to push to (created if missing)")
    parser.add_argument("--endpoint", help="Hub endpoint (default: HF_ENDPOINT, else huggingface.co)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    official = (args.model_name and find_official_checkpoint(args.model_name)) or find_official_checkpoint(
        args.checkpoint
    )
    repo_id = args.repo_id or (official.repo_id() if official and args.push_to_hub else None)
    if args.push_to_hub and not repo_id:
        return fail("--push-to-hub needs --repo-id for a file that is not an official checkpoint")
    try:
        convert_checkpoint(
            args.checkpoint,
            args.output_dir,
            model_name=args.model_name,
            resolution=args.resolution,
            verify=args.verify,
            verify_image_size=args.verify_image_size,
            repo_id=repo_id,
            overwrite=args.overwrite,
            cache_dir=args.cache_dir,
            expected_sha256=args.sha256,
        )
    except ValueError as error:
        return fail(str(error))
    except KeyboardInterrupt as interrupt:  # the staging folder is already gone
        signum = interrupt.signum if isinstance(interrupt, ConversionInterrupted) else 2
        print(f"error: {str(interrupt) or 'interrupted'}; no output folder was written", file=sys.stderr)
        return 128 + signum
    if args.push_to_hub:
        try:
            commit = push_folder_to_hub(
                args.output_dir, repo_id, endpoint=args.endpoint, private=args.private, revision=args.revision
            )
        except Exception as error:  # any Hub or network failure: the converted folder stays for a later push
            return fail(f"pushing {args.output_dir} to {repo_id} failed: {error}")
        print(f"pushed {args.output_dir} to {repo_id}: {commit.commit_url}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
