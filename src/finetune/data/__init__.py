"""The image-classification data: download and verify, find and check the images, split, transform, cache, load.

- :mod:`~finetune.data.download`: fetch a zipped dataset once and check its sha1.
- :mod:`~finetune.data.folders`: the ``train/<class>/``, ``test/<class>/`` layout; :mod:`~finetune.data.images`:
  how an image file is read; :mod:`~finetune.data.verify`: images that do not decode, duplicates;
  :mod:`~finetune.data.splits`: the validation split.
- :mod:`~finetune.data.transforms`: the book's train transform and the eval preprocessing record.
- :mod:`~finetune.data.settings`: the ``data.*`` settings, checked before any image is read.
- :mod:`~finetune.data.cache`: decode every image once (``data.cache=memory|disk``).
- :mod:`~finetune.data.datamodule`: :class:`ImageFolderDataModule`, which ties them together.
"""

from finetune.data.datamodule import ImageFolderDataModule
from finetune.data.download import download_and_extract, file_digest
from finetune.data.folders import scan_image_folder
from finetune.data.images import is_image_file, load_rgb
from finetune.data.transforms import IMAGENET_MEAN, IMAGENET_STD, Preprocessing, eval_transform, train_transform

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageFolderDataModule",
    "Preprocessing",
    "download_and_extract",
    "eval_transform",
    "file_digest",
    "is_image_file",
    "load_rgb",
    "scan_image_folder",
    "train_transform",
]
