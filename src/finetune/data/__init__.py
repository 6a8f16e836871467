"""The image-classification data: download and verify, find and check the images, split, transform, cache, load.

- :mod:`~finetune.data.download`: fetch a zipped dataset once and check its sha1.
- :mod:`~finetune.data.folders`: the ``train/<class>/``, ``test/<class>/`` layout, image checks, the split.
- :mod:`~finetune.data.transforms`: the book's train and eval transforms.
- :mod:`~finetune.data.cache`: decode every image once (``data.cache=memory|disk``).
- :mod:`~finetune.data.datamodule`: :class:`ImageFolderDataModule`, which ties them together.
"""

from finetune.data.datamodule import ImageFolderDataModule
from finetune.data.download import download_and_extract, file_digest
from finetune.data.folders import find_corrupt_images, is_image_file, load_rgb, scan_image_folder, stratified_split
from finetune.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    book_resize_size,
    eval_geometry,
    eval_transform,
    to_normalized_tensor,
    train_transform,
)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageFolderDataModule",
    "book_resize_size",
    "download_and_extract",
    "eval_geometry",
    "eval_transform",
    "find_corrupt_images",
    "is_image_file",
    "load_rgb",
    "scan_image_folder",
    "file_digest",
    "stratified_split",
    "to_normalized_tensor",
    "train_transform",
]
