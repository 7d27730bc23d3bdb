"""FolderDataset: image/mask pairs from disk, decoded by Pillow.

Layout::

    root/images/<stem>.png|.jpg|.jpeg     any mode Pillow reads; greyscale, palette and RGBA become RGB
    root/masks/<stem>.png                 same width and height as its image

Mask rule: the mask is converted to 8-bit greyscale (Pillow mode ``L``) and a pixel is foreground when its value
is **> 127**. So 0/255 masks, anti-aliased masks (edge pixels split at 127) and palette masks with a bright object
colour all work. A mask whose values are all in 0..127 but not all 0 (e.g. a 0/1 mask) would silently read as
empty, so it is refused with a clear error instead.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .loader import SegmentationDataset
from .transforms import resize_pair

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
MASK_THRESHOLD = 127


def _open(path: Path, what: str):
    """Open an image with Pillow (header only) or raise ValueError naming the file."""
    from PIL import Image, UnidentifiedImageError
    try:
        return Image.open(path)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ValueError(f"cannot read {what} {str(path)!r}: not a readable image ({type(e).__name__})") from None


def load_image(path) -> np.ndarray:
    """Decode an image file as RGB. Shapes: -> (H, W, 3) float32 in [0, 1]. ValueError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"image file not found: {str(path)!r}")
    im = _open(path, "image")
    try:
        with im:
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                im = im.convert("RGBA").convert("RGB")   # drop alpha (composited as-is, not over white)
            rgb = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    except (OSError, ValueError, SyntaxError) as e:
        raise ValueError(f"cannot decode image {str(path)!r}: corrupt or truncated file ({e})") from None
    return rgb


def load_mask(path) -> np.ndarray:
    """Decode a mask: greyscale ``L`` value > 127 is foreground. Shapes: -> (H, W) float32 in {0, 1}."""
    path = Path(path)
    im = _open(path, "mask")
    try:
        with im:
            grey = np.asarray(im.convert("L"))
    except (OSError, ValueError, SyntaxError) as e:
        raise ValueError(f"cannot decode mask {str(path)!r}: corrupt or truncated file ({e})") from None
    if grey.max(initial=0) <= MASK_THRESHOLD and grey.max(initial=0) > 0:
        raise ValueError(f"mask {str(path)!r} has values in 1..{int(grey.max())} but none > {MASK_THRESHOLD}; "
                         "masks must be 0 for background and > 127 (e.g. 255) for foreground")
    return (grey > MASK_THRESHOLD).astype(np.float32)


class FolderDataset(SegmentationDataset):
    """Image/mask pairs from ``root/images`` and ``root/masks`` (see the module docstring for the rules).

    The constructor checks the layout: both folders exist, at least one image, every image has a mask with the
    same stem, and (reading only the file headers) every file opens and each mask has its image's size. Decoding
    errors of a file whose header is fine surface when the item is read, again as a ValueError naming the file.

    Shapes:
        item -> image (3, H, W) float32 (ImageNet-normalised), mask (1, H, W) float32 in {0, 1};
        ``(H, W) = (size, size)`` when ``size`` is given, else the file's own size.

    Args:
        root: the dataset folder.
        size: resize every pair to ``size x size`` (needed to batch images of different sizes).
        transform, rng, normalize: see ``SegmentationDataset``.
    """

    def __init__(self, root, size: int | None = None, transform=None, rng=None, normalize: bool = True):
        super().__init__(transform, rng, normalize)
        self.root = Path(root)
        self.size = None if size is None else int(size)
        images_dir, masks_dir = self.root / "images", self.root / "masks"
        if not self.root.is_dir():
            raise ValueError(f"dataset folder not found: {str(self.root)!r}")
        for d in (images_dir, masks_dir):
            if not d.is_dir():
                raise ValueError(f"dataset folder {str(self.root)!r} has no '{d.name}/' subfolder "
                                 "(expected root/images/*.png|jpg and root/masks/*.png)")
        self.images = sorted(p for p in images_dir.iterdir()
                             if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.images:
            raise ValueError(f"no images (*.png, *.jpg, *.jpeg) in {str(images_dir)!r}")
        stems = [p.stem for p in self.images]
        duplicates = sorted({s for s in stems if stems.count(s) > 1})
        if duplicates:
            raise ValueError(f"several images share the stem(s) {duplicates} in {str(images_dir)!r}")
        self.masks = [masks_dir / (p.stem + ".png") for p in self.images]
        missing = [m.name for m in self.masks if not m.is_file()]
        if missing:
            raise ValueError(f"missing mask(s) in {str(masks_dir)!r} for {len(missing)} image(s): "
                             f"{', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
        for img_path, mask_path in zip(self.images, self.masks):
            with _open(img_path, "image") as im, _open(mask_path, "mask") as m:
                if im.size != m.size:
                    raise ValueError(f"size mismatch: image {img_path.name!r} is {im.size[0]}x{im.size[1]} but "
                                     f"mask {mask_path.name!r} is {m.size[0]}x{m.size[1]} (width x height)")

    def __len__(self) -> int:
        return len(self.images)

    def raw(self, index: int):
        image, mask = load_image(self.images[index]), load_mask(self.masks[index])
        if image.shape[:2] != mask.shape:   # the header check makes this rare (e.g. a file replaced meanwhile)
            raise ValueError(f"size mismatch: image {os.fspath(self.images[index])!r} {image.shape[:2]} vs mask "
                             f"{mask.shape}")
        if self.size is not None:
            image, mask = resize_pair(image, mask, (self.size, self.size))
        return image, mask

    def __repr__(self):
        return f"FolderDataset({str(self.root)!r}, {len(self)} pairs, size={self.size})"
