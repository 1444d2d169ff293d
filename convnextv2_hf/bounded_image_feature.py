"""``BoundedImage``: the ``datasets`` ``Image`` feature that ``image_folder_dataset`` gives its image column when it
applies no transform, so that every image the dataset yields is decoded by ``image_loading.open_image``: bounded
by the decoding pixel limit (``set_max_image_pixels`` / ``CONVNEXTV2_MAX_IMAGE_PIXELS``; an image over it is a
``ValueError`` naming the file and the limit, raised before its pixels are decoded), EXIF orientation applied as
``datasets`` does, mode kept. ``datasets``' own ``Image`` decodes with PIL alone, which only warns up to twice
PIL's limit (a 12000 x 12000 PNG decodes to 432 MB as RGB) and knows nothing of the package's limit.

A module of its own: ``datasets`` is an optional dependency (the "training" extra). It serialises as a plain
``Image`` (its ``_type`` is "Image"), so a dataset saved with it loads anywhere, unbounded there.
"""

from __future__ import annotations

from dataclasses import dataclass

import datasets
from datasets.utils.file_utils import is_local_path

from .image_loading import open_image


@dataclass(repr=False)
class BoundedImage(datasets.Image):
    """``datasets.Image`` whose decoding of local files and bytes is ``open_image``'s (module docstring); other
    values (remote files of a streamed Hub dataset) are decoded as ``datasets`` does."""

    def __repr__(self) -> str:
        return f"BoundedImage(mode={self.mode!r}, decode={self.decode!r})"

    def decode_example(self, value, token_per_repo_id=None):
        if not self.decode or not isinstance(value, dict):
            return super().decode_example(value, token_per_repo_id)
        path, data = value.get("path"), value.get("bytes")
        if data is None and (path is None or not is_local_path(path)):
            return super().decode_example(value, token_per_repo_id)
        image = open_image(value)
        if self.mode and self.mode != image.mode:
            image = image.convert(self.mode)
        return image


def bounded_images(dataset, image_column: str):
    """``dataset`` (a ``Dataset`` or ``IterableDataset``) with ``image_column`` decoded by ``BoundedImage``."""
    feature = (dataset.features or {}).get(image_column)
    if isinstance(feature, datasets.Image) and feature.decode and not isinstance(feature, BoundedImage):
        return dataset.cast_column(image_column, BoundedImage(mode=feature.mode))
    return dataset
