"""FolderDataset: image/mask pairs from disk, decoded by Pillow and checked before training.

Layout::

    root/images/<stem>.png|.jpg|.jpeg|.tif|.tiff|.bmp|.webp    any mode Pillow reads (see ``decode``)
    root/masks/<stem>.png|.tif|.tiff|.bmp                      same width and height as its image, once upright

How an image becomes RGB and how a mask becomes {0, 1} (16-bit files, EXIF orientation, alpha, palette and PASCAL
VOC masks with a void border) is the table in ``minideeplab.data.decode`` (also in docs/cli.md, "Data").

Every file is read, decoded and checked (size, the mask rule) when the dataset is built, with a progress bar for
large folders, so a truncated or unreadable file fails before the first training step, naming the file; pass
``verify=False`` to skip that pass. The same pass records a fingerprint of the files (names, byte sizes, CRC-32
of the contents) that a training checkpoint keeps to refuse resuming on a changed dataset.
"""
from __future__ import annotations

import hashlib
import zlib
from pathlib import Path

from .decode import VOID_CHOICES, image_array, load_image, load_mask, mask_array, open_image, read_bytes
from .loader import SegmentationDataset
from .transforms import resize_pair

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
MASK_SUFFIXES = (".png", ".tif", ".tiff", ".bmp")


def _listing(folder: Path, what: str) -> list[Path]:
    try:
        return sorted(folder.iterdir())
    except PermissionError:
        raise ValueError(f"cannot list the {what} folder {str(folder)!r}: permission denied") from None


class FolderDataset(SegmentationDataset):
    """Image/mask pairs from ``root/images`` and ``root/masks`` (the layout and rules: the module docstring).

    The constructor checks the layout (both folders, at least one image, one mask per image stem, no folder named
    like an image) and, unless ``verify=False``, decodes every image and mask once (``verify()``): a file that
    cannot be read or decoded, a mask of another size than its image, or an ambiguous mask raises a ValueError
    naming the file before anything trains.

    Shapes:
        item -> image (3, H, W) float32 (ImageNet-normalised), mask (1, H, W) float32 in {0, 1};
        ``(H, W) = (size, size)`` when ``size`` is given, else the (upright) file's own size.

    Args:
        root: the dataset folder.
        size: resize every pair to ``size x size`` (needed to batch images of different sizes).
        transform, rng, normalize: see ``SegmentationDataset``.
        mask_void: what void mask pixels (index 255 of a VOC-style mask) become: "background" (default),
            "object", or "error" to refuse such masks.
        verify: decode and check every file now (default True).
        progress: progress bar of the check: True, False, or None (shown when it takes over a second on a
            terminal).
    """

    def __init__(self, root, size: int | None = None, transform=None, rng=None, normalize: bool = True,
                 mask_void: str = "background", verify: bool = True, progress: bool | None = None):
        super().__init__(transform, rng, normalize)
        self.root = Path(root)
        self.size = None if size is None else int(size)
        if mask_void not in VOID_CHOICES:
            raise ValueError(f"FolderDataset: mask_void must be one of {VOID_CHOICES}, got {mask_void!r}")
        self.mask_void = mask_void
        if self.root.is_file():
            raise ValueError(f"dataset folder {str(self.root)!r} is a file, not a folder")
        if not self.root.is_dir():
            raise ValueError(f"dataset folder not found: {str(self.root)!r}")
        images_dir, masks_dir = self.root / "images", self.root / "masks"
        for d in (images_dir, masks_dir):
            if not d.is_dir():
                raise ValueError(f"dataset folder {str(self.root)!r} has no '{d.name}/' subfolder "
                                 "(expected root/images/*.png|jpg and root/masks/*.png)")
        entries = [p for p in _listing(images_dir, "images") if p.suffix.lower() in IMAGE_SUFFIXES]
        folders = [p.name for p in entries if p.is_dir()]
        if folders:
            raise ValueError(f"{str(images_dir / folders[0])!r} is a folder, not an image "
                             f"({len(folders)} such folder(s) in {str(images_dir)!r})")
        self.images = [p for p in entries if p.is_file()]
        if not self.images:
            raise ValueError(f"no images ({', '.join('*' + s for s in IMAGE_SUFFIXES)}) in {str(images_dir)!r}")
        stems = [p.stem for p in self.images]
        duplicates = sorted({s for s in stems if stems.count(s) > 1})
        if duplicates:
            raise ValueError(f"several images share the stem(s) {duplicates} in {str(images_dir)!r}")
        self.masks = self._find_masks(masks_dir)
        self.records = None      # per file (name, bytes, CRC-32), filled by verify()
        if verify:
            self.verify(progress)

    def _find_masks(self, masks_dir: Path) -> list[Path]:
        by_stem = {}
        for p in _listing(masks_dir, "masks"):
            if p.suffix.lower() in MASK_SUFFIXES:
                by_stem.setdefault(p.stem, []).append(p)
        masks, missing = [], []
        for image in self.images:
            found = by_stem.get(image.stem, [])
            if len(found) > 1:
                raise ValueError(f"several masks for image {image.name!r} in {str(masks_dir)!r}: "
                                 f"{', '.join(sorted(p.name for p in found))}")
            if not found:
                missing.append(image.stem + ".png")
                continue
            if found[0].is_dir():
                raise ValueError(f"mask {str(found[0])!r} is a folder, not a file")
            masks.append(found[0])
        if missing:
            raise ValueError(f"missing mask(s) in {str(masks_dir)!r} for {len(missing)} image(s): "
                             f"{', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
        return masks

    def _pair(self, index: int, image_data=None, mask_data=None):
        """The upright ``(image (H, W, 3), mask (H, W))`` of pair ``index``, sizes checked."""
        image_path, mask_path = self.images[index], self.masks[index]
        im = open_image(image_path, "image", image_data)
        with im:
            image = image_array(im, image_path)
        m = open_image(mask_path, "mask", mask_data)
        with m:
            if m.size != im.size:
                raise ValueError(f"size mismatch: image {image_path.name!r} is {im.size[0]}x{im.size[1]} but "
                                 f"mask {mask_path.name!r} is {m.size[0]}x{m.size[1]} (width x height, upright)")
            mask = mask_array(m, mask_path, self.mask_void)
        return image, mask

    def verify(self, progress: bool | None = None) -> FolderDataset:
        """Read and decode every image and mask once (the same code as training), checking each pair's size and
        the mask rule, and record the fingerprint; ValueError naming the first bad file. Returns self."""
        from tqdm import tqdm
        records = []
        bar = tqdm(range(len(self)), desc=f"checking {self.root.name or self.root}", unit="pair", leave=False,
                   disable=None if progress is None else not progress, delay=0 if progress else 1.0)
        for i in bar:
            image_data = read_bytes(self.images[i], "image")
            mask_data = read_bytes(self.masks[i], "mask")
            self._pair(i, image_data, mask_data)
            for path, data in ((self.images[i], image_data), (self.masks[i], mask_data)):
                records.append((f"{path.parent.name}/{path.name}", len(data), zlib.crc32(data)))
        self.records = records
        return self

    def fingerprint(self) -> dict:
        """What identifies the files: their count and bytes, a hash of the names and sizes (``listing``) and a hash
        of the contents (``content``). Reads every file when ``verify`` has not run."""
        if self.records is None:
            self.records = []
            for path in (p for pair in zip(self.images, self.masks) for p in pair):
                data = read_bytes(path, "image" if path.parent.name == "images" else "mask")
                self.records.append((f"{path.parent.name}/{path.name}", len(data), zlib.crc32(data)))
        listing = hashlib.sha256("\n".join(f"{n}\t{s}" for n, s, _ in self.records).encode()).hexdigest()
        content = hashlib.sha256("\n".join(f"{n}\t{c}" for n, _, c in self.records).encode()).hexdigest()
        return {"files": len(self.records), "bytes": sum(s for _, s, _ in self.records),
                "listing": listing[:16], "content": content[:16]}

    def __len__(self) -> int:
        return len(self.images)

    def raw(self, index: int):
        image, mask = self._pair(index)
        if self.size is not None:
            image, mask = resize_pair(image, mask, (self.size, self.size))
        return image, mask

    def __repr__(self):
        return f"FolderDataset({str(self.root)!r}, {len(self)} pairs, size={self.size})"


__all__ = ["IMAGE_SUFFIXES", "MASK_SUFFIXES", "FolderDataset", "load_image", "load_mask"]
