"""Conversion of the official ConvNeXt V2 checkpoints into this package's Hugging Face models.

The conversion is data plus a small engine, one job a module:

- ``key_maps``: the data. ``SPARSE_TO_DENSE_RULES``: how the MinkowskiEngine names and shapes of the official
  *pretraining* code (``encoder.…`` sparse blocks, ``proj``, ``mask_token``, ``decoder.0``, ``pred``) become the
  official dense layout, with one reshape rule per kind of tensor (``sparse_kernel_to_dense`` is the documented
  kernel remapping); ``KEY_TABLE``: official dense names -> our (= transformers') names, as regular expressions;
  ``checkpoints.OFFICIAL_CHECKPOINTS``: the 26 released files.
- ``reading``: reads a file safely (``load_original_checkpoint``), recognises one of three layouts
  (``detect_layout``) and reads depths and widths off the tensor shapes (``infer_architecture``).
- ``building``: renames and loads the model with every tensor accounted for (``convert_state_dict``).
- ``verification``: checks it against timm's ConvNeXt V2 loaded through timm's own checkpoint filter from the same
  original tensors (``verify_against_timm``).
- ``output``: writes the output folder atomically (``write_output_folder``) and pushes it to the Hub.
- ``convert``: ``convert_checkpoint``, all of it in one call, and the scripts' argument parsers.

Every problem with the input is a ``ValueError`` naming it.

Safety: tensors are checked (string names, no scalars, real finite floats, no shape larger than the data the file
stores) before anything is computed from them, and the model is first built on the meta device, so a small
hostile file cannot make the conversion allocate gigabytes. An output folder carries a marker
(``CONVERSION_MARKER``: source, SHA-256, time, package version); ``overwrite`` replaces only such a folder, never
the working directory, an ancestor of it or of the source, the root or the home folder.

Every name is importable from ``convnextv2_hf.conversion`` itself; a test that patches a name patches it in the
module that looks it up (``verification.draw_mask``, ``building.SPARSE_TO_DENSE_RULES``,
``convert.load_original_checkpoint``).
"""

from .building import DEFAULT_RESOLUTION, ConvertedCheckpoint, convert_state_dict
from .convert import (
    ConversionReport,
    card_facts_for_conversion,
    convert_checkpoint,
    parse_model_name,
    parse_sha256,
    positive_int_argument,
)
from .key_maps import (
    FCMAE_ENCODER,
    FCMAE_PRETRAINING,
    FINAL_NORM_IDENTITY,
    FINETUNED,
    KEY_TABLE,
    OTHER_ARCHITECTURES,
    SPARSE_TO_DENSE_RULES,
    Layout,
    StateDict,
    apply_key_rules,
    sparse_kernel_to_dense,
)
from .output import (
    CONVERSION_MARKER,
    ConversionInterrupted,
    check_output_dir,
    is_converted_folder,
    push_folder_to_hub,
    read_conversion_marker,
    remove_stale_partials,
    write_output_folder,
)

# the package's export module shares the staging-folder signal handling and the disk-error message
from .output import describe_write_error as describe_write_error
from .output import signals_deferred as signals_deferred
from .output import signals_raise as signals_raise
from .reading import (
    Architecture,
    OriginalCheckpoint,
    check_state_dict,
    default_cache_dir,
    detect_layout,
    infer_architecture,
    load_original_checkpoint,
    resolve_checkpoint,
    sha256_of_file,
)
from .verification import (
    VERIFICATION_TOLERANCE,
    VerificationError,
    VerificationResult,
    build_timm_reference,
    remap_pretraining_checkpoint_like_official,
    top5_on_photo,
    verify_against_timm,
)

__all__ = [
    "CONVERSION_MARKER",
    "DEFAULT_RESOLUTION",
    "FCMAE_ENCODER",
    "FCMAE_PRETRAINING",
    "FINAL_NORM_IDENTITY",
    "FINETUNED",
    "KEY_TABLE",
    "OTHER_ARCHITECTURES",
    "SPARSE_TO_DENSE_RULES",
    "VERIFICATION_TOLERANCE",
    "Architecture",
    "ConversionInterrupted",
    "ConversionReport",
    "ConvertedCheckpoint",
    "Layout",
    "OriginalCheckpoint",
    "StateDict",
    "VerificationError",
    "VerificationResult",
    "apply_key_rules",
    "build_timm_reference",
    "card_facts_for_conversion",
    "check_output_dir",
    "check_state_dict",
    "convert_checkpoint",
    "convert_state_dict",
    "default_cache_dir",
    "detect_layout",
    "infer_architecture",
    "is_converted_folder",
    "load_original_checkpoint",
    "parse_model_name",
    "parse_sha256",
    "positive_int_argument",
    "push_folder_to_hub",
    "read_conversion_marker",
    "remap_pretraining_checkpoint_like_official",
    "remove_stale_partials",
    "resolve_checkpoint",
    "sha256_of_file",
    "sparse_kernel_to_dense",
    "top5_on_photo",
    "verify_against_timm",
    "write_output_folder",
]
