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
encoder plus decoder (-> ConvNextV2ForMaskedImageModeling). Any problem exits non-zero and writes no folder.
"""

from __future__ import annotations

import argparse

from convnextv2_hf.checkpoints import find_official_checkpoint
from convnextv2_hf.conversion import convert_checkpoint, push_folder_to_hub


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="local file, official URL or official name")
    parser.add_argument("--output-dir", required=True, help="folder to create (written atomically)")
    parser.add_argument(
        "--model-name",
        help="convnextv2_<size>, <size>, 'custom' or an official name; default: from the file name, else the shapes",
    )
    parser.add_argument("--resolution", type=int, help="image size of the checkpoint (default: from the name, or 224)")
    parser.add_argument(
        "--verify",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="compare with timm's ConvNeXt V2 before writing (default: on)",
    )
    parser.add_argument("--verify-image-size", type=int, help="side of the verification input (default: resolution)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument("--cache-dir", help="where official files are downloaded (default: torch.hub's cache)")
    parser.add_argument("--push-to-hub", action="store_true")
    parser.add_argument("--repo-id", help="Hub repository (default for official files: the table's suggestion)")
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
        raise SystemExit("error: --push-to-hub needs --repo-id for a file that is not an official checkpoint")
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
        )
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    if args.push_to_hub:
        try:
            commit = push_folder_to_hub(
                args.output_dir, repo_id, endpoint=args.endpoint, private=args.private, revision=args.revision
            )
        except Exception as error:  # any Hub or network failure: the converted folder stays for a later push
            raise SystemExit(f"error: pushing {args.output_dir} to {repo_id} failed: {error}") from None
        print(f"pushed {args.output_dir} to {repo_id}: {commit.commit_url}")
    return 0


if __name__ == "__main__":
    main()
