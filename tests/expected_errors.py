"""The error texts that several test files expect, each defined once here and referenced by name.

Most are regular expressions, searched for in the message (``pytest.raises(match=...)``, ``re.search``, the fault
hunt's ``error=``); the few that a test also looks for as a plain substring (``in``) hold no regex metacharacters,
so both readings agree. Texts a single file expects stay in that file.
"""

# --- configuration -------------------------------------------------------------------------------------------------

UNKNOWN_PRESET = "unknown ConvNeXt V2 preset 'gigantic'"
MASK_RATIO_OUT_OF_RANGE = "0 < mask_ratio < 1"
DEPTHS_AND_WIDTHS_LENGTHS_DIFFER = "depths and hidden_sizes must have the same length"
CONFIG_OF_ANOTHER_ARCHITECTURE = r"another architecture \(model_type='convnext'"
# id2label / label2id
ID2LABEL_VALUE_NOT_A_NAME = r"id2label values must be label names \(str\), but '0' maps to 5"
ID2LABEL_KEY_NOT_AN_INDEX = r"id2label keys must be class indices .*not 'cat'"
LABEL_MAPS_DISAGREE = r"label2id and id2label disagree: label2id\['a'\] = 1 but id2label\[1\] = 'b'"
NUM_LABELS_AGAINST_ID2LABEL = "num_labels=5 does not match the 2 classes named by id2label"

# --- model inputs --------------------------------------------------------------------------------------------------

PIXELS_OF_INTEGER_DTYPE = "floating-point tensor, got dtype torch.uint8"
WRONG_NUMBER_OF_CHANNELS = "has 1 channels but the model expects num_channels=3"
LABELS_OUT_OF_RANGE = r"must lie in \[0, 4\]"  # class ids of a 5-class classifier
SOFT_LABELS_SHAPE = "soft labels must have the logits' shape"
MODEL_BEYOND_THE_BOUNDS = "beyond the bounds"  # a config whose model would exceed the size bound
# FCMAE masks
NOISE_SHAPE = r"noise must have shape \(batch, patches\) = \(2, 4\)"
NOISE_NOT_FINITE = "noise holds 1 NaN or infinite values of 8"
MASK_AND_NOISE_BOTH_GIVEN = "pass bool_masked_pos or noise, not both"
MASK_REMOVES_EVERY_PATCH = "removes every patch of a sample"

# --- image processor -----------------------------------------------------------------------------------------------

CROP_PCT_OUT_OF_RANGE = r"crop_pct must be a number in \(0, 1\].*got 0"
SHORTEST_EDGE_NOT_POSITIVE = r"size\['shortest_edge'\] must be a positive integer, got 0"
SIZE_NOT_SHORTEST_EDGE = r"size must be \{'shortest_edge': S\}"
IMAGE_MEAN_WRONG_LENGTH = "image_mean must have 3 values .*got 2"
IMAGE_STD_NOT_POSITIVE = "image_std must be positive"
RESCALE_FACTOR_NOT_POSITIVE = "rescale_factor must be a positive number"
EMPTY_BATCH_OF_IMAGES = "the batch of images is empty"

# --- conversion: files that are not a convertible checkpoint (helpers.write_bad_input) ----------------------------

NOT_A_PYTORCH_CHECKPOINT = "not a readable PyTorch checkpoint"
CODE_RUNNING_PICKLE_REFUSED = "refused to load .*would import or call 'io.open'"
MISSING_TENSOR = "missing 1 tensor.*stages.1.layers.0.pwconv2.weight"
UNEXPECTED_TENSOR = "unexpected tensors .*stages.1.0.extra.weight"
SHAPES_OF_ANOTHER_SIZE_THAN_NAMED = "are those of 'custom', not of the expected model 'atto'"
CHECKPOINT_MODEL_TOO_LARGE = r"builds a ConvNextV2\w+ of [\d,]+ parameters .* beyond the bounds of"
# malformed keys and tensors (helpers.malformed_state)
ZERO_D_TENSOR = "tensor 'head.bias' is 0-d"
INTEGER_KEY = "key 7 is a int, not a tensor name"
COMPLEX_TENSOR = "tensor 'head.weight' has dtype torch.complex64"
INTEGER_TENSOR = "tensor 'head.bias' has dtype torch.int64"
LIST_NOT_A_TENSOR = "'stages.0.0.norm.weight' is a list, not a tensor"

# --- conversion: the output folder ---------------------------------------------------------------------------------

OUTPUT_FOLDER_EXISTS = "already exists"
OUTPUT_IS_A_SYMLINK = "is a symbolic link"
OUTPUT_IS_A_FILE = "is an existing file, not a folder"
DISK_FULL_WHILE_WRITING = "could not write the output folder .*out: no space left on the disk"
# the failure the tests inject into the model-card writer (helpers.broken_card_save), and what they match of it
INJECTED_CARD_FAILURE = "the card renderer broke"
INJECTED_CARD_FAILURE_MATCH = "renderer broke"

# --- deployment export ---------------------------------------------------------------------------------------------

ONNX_HAS_NO_BF16 = "onnx offers the precisions f32, fp16, not bf16"
UNKNOWN_EXPORT_FORMAT = "argument --format: invalid choice: 'tflite'"

# --- training: the example scripts' arguments and the Trainer plug-ins ---------------------------------------------

UNKNOWN_MODEL_SIZE = "unknown model size 'gigantic'"
UNKNOWN_RECIPE = "unknown recipe 'small'"
LAYER_DECAY_OUT_OF_RANGE = r"layer_decay must be in \(0, 1\], got 0"
LAYER_DECAY_OUT_OF_RANGE_ANY_VALUE = "layer_decay must be in"
LAYER_DECAY_TYPE_UNKNOWN = "layer_decay_type must be 'single' or 'group'"
EMA_DECAY_ARGUMENT_OUT_OF_RANGE = r"ema_decay must be 0 \(off\) or in \(0, 1\)"  # the scripts' --ema_decay
EMA_DECAY_OUT_OF_RANGE = r"EMA decay must be in \(0, 1\)"  # EMACallback
LABEL_SMOOTHING_OUT_OF_RANGE = r"label_smoothing must be in \[0, 1\)"
LEARNING_RATE_NOT_FINITE = "learning_rate must be a finite number, got inf"
VALIDATION_FRACTION_OUT_OF_RANGE = r"validation_fraction must be in \(0, 1\), got 1.5"
STREAMING_NEEDS_MAX_STEPS = "--streaming needs --max_steps"
CLASS_WITH_TOO_FEW_IMAGES = r"class\(es\) \{'b': 1\} .*fewer than 2 training images"
TRAINING_STOPPED_NON_FINITE = r"training stopped at step \d+: the"
# image folders and unreadable images
FOLDER_HOLDS_NO_IMAGES = "holds no images"
IMAGES_NOT_IN_CLASS_FOLDERS = r"the images of .*flat' are not in class sub-folders"
EVERY_IMAGE_OF_BATCH_SKIPPED = "every image of this batch of 2 was skipped as unreadable"
SKIPPING_UNREADABLE_IMAGE = "skipping unreadable image"  # the warning; a space and the image's path follow
