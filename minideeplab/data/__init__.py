"""Datasets, joint image/mask transforms and a DataLoader.

Items are ``(image (3, H, W) float32 ImageNet-normalised, mask (1, H, W) float32 in {0, 1})``.
"""
from .folder import FolderDataset, load_image, load_mask
from .loader import ConcatDataset, DataLoader, SegmentationDataset, Subset
from .synthetic import SYNTHETIC_DATA, SyntheticShapes, render_shapes
from .synthetic_variants import render_context, render_fine
from .transforms import (
                         IMAGENET_MEAN,
                         IMAGENET_STD,
                         ColorJitter,
                         Compose,
                         Normalize,
                         RandomHorizontalFlip,
                         RandomScaleCrop,
                         Resize,
                         denormalize,
                         normalize,
                         train_transform,
)

__all__ = [
                         "IMAGENET_MEAN",
                         "IMAGENET_STD",
                         "ColorJitter",
                         "Compose",
                         "ConcatDataset",
                         "DataLoader",
                         "FolderDataset",
                         "Normalize",
                         "RandomHorizontalFlip",
                         "RandomScaleCrop",
                         "Resize",
                         "SYNTHETIC_DATA",
                         "SegmentationDataset",
                         "Subset",
                         "SyntheticShapes",
                         "denormalize",
                         "load_image",
                         "load_mask",
                         "normalize",
                         "render_context",
                         "render_fine",
                         "render_shapes",
                         "train_transform",
]
