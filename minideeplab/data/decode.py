"""Images and masks read as a viewer shows them, and the rule that turns a mask file into {0, 1}.

Both are turned upright first: an EXIF orientation tag (cameras, phones) is applied with
``PIL.ImageOps.exif_transpose``, so an image and its mask agree whatever the files store.

**Images** become RGB float32 in [0, 1]:

| Pillow mode | read as |
|---|---|
| ``RGB``, ``L``, ``1``, ``P``, ``CMYK``, ``YCbCr`` | Pillow's ``convert("RGB")`` (CMYK by its formula, no colour profile) |
| ``I;16`` (16-bit grey PNG) and ``I`` with values in 0..65535 | value / 65535, not clipped at 255 |
| ``F`` (32-bit float TIFF) | the values themselves; they must be finite and in [0, 1] |
| ``LA``, ``RGBA``, ``PA``, ``P``/``L``/``RGB`` with a transparent colour | composited over **white** (as a viewer on a white page shows it) |

16-bit RGB PNGs are read by Pillow at 8 bits (their high byte), which is the same scaling.

**Masks** (the mask rule). ``R`` is the file's full range (255 for 8 bits, 65535 for 16) and ``H = R // 2``
(127, 32767). A pixel is object (1) or background (0), or *void* (PASCAL VOC's "don't care" border):

| mask file | object | void |
|---|---|---|
| grey (``L``, ``1``, ``I;16``, ``I``) with any value in H+1..R-1 (e.g. anti-aliased 0/255) | value > H | none |
| grey with values only in 0..H (e.g. a 0/1 or 0..20 index mask) | value > 0 | none |
| grey with values in 1..H and R, none between (a VOC-style index mask saved as grey) | 1..H | R |
| grey with values only 0 and R | R | none |
| palette (``P``) whose used colours are all grey | the grey rows above, on those grey levels | |
| palette with coloured entries (PASCAL VOC: 0 background, 1..254 classes, 255 border) | index 1..254 | index 255 |
| colour (``RGB``) | any colour but black | the VOC border colour (224, 224, 192) |
| with an alpha channel that varies (``LA``, ``RGBA``, transparency) and colours that do not | alpha > 127 | none |

An alpha channel that is constant is ignored (the colours decide). A mask whose alpha and colours both vary
(among its opaque pixels) is ambiguous and refused. Void pixels follow ``void``: ``"background"`` (the default: the
object is read without its uncertain border; this library's losses have no ignore label), ``"object"``, or
``"error"`` (refuse such masks). Every error is a ``ValueError`` naming the file.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np

VOID_CHOICES = ("background", "object", "error")
VOC_VOID_COLOUR = (224, 224, 192)     # the colour of index 255 in the PASCAL VOC palette


def _check_file(path: Path, what: str) -> None:
    if path.is_dir():
        raise ValueError(f"{what} {str(path)!r} is a folder, not a file")
    if not path.exists():
        raise ValueError(f"{what} file not found: {str(path)!r}")


def read_bytes(path, what: str = "image") -> bytes:
    """The file's bytes, or a ValueError naming it (not found, a folder, permission denied, I/O error)."""
    path = Path(path)
    _check_file(path, what)
    try:
        return path.read_bytes()
    except PermissionError:
        raise ValueError(f"cannot read {what} {str(path)!r}: permission denied") from None
    except OSError as e:
        raise ValueError(f"cannot read {what} {str(path)!r}: {e.strerror or e}") from None


def open_image(path, what: str = "image", data: bytes | None = None):
    """Pillow image of ``path`` (from ``data`` when the bytes were read already), decoded and turned upright by
    its EXIF orientation. ValueError naming the file when it is not a readable image."""
    from PIL import Image, ImageOps, UnidentifiedImageError
    path = Path(path)
    data = read_bytes(path, what) if data is None else data
    try:
        im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise ValueError(f"cannot read {what} {str(path)!r}: larger than Pillow's safety limit of "
                         f"{Image.MAX_IMAGE_PIXELS} pixels ({e}); downscale it, or raise "
                         "PIL.Image.MAX_IMAGE_PIXELS if you trust the file") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise ValueError(f"cannot read {what} {str(path)!r}: not a readable image ({type(e).__name__})") from None
    try:
        ImageOps.exif_transpose(im, in_place=True)       # decodes the pixels, then applies the orientation
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise ValueError(f"cannot decode {what} {str(path)!r}: corrupt or truncated file ({e})") from None
    return im


def _alpha_varies(im):
    """``(colour image, alpha array or None)``: the alpha channel when the image has one that is not constant
    (then the colour image has no alpha), else ``(im, None)``."""
    with_alpha = im
    if im.mode in ("P", "L", "RGB") and "transparency" in im.info:
        with_alpha = im.convert("RGBA") if im.mode in ("P", "RGB") else im.convert("LA")
    if with_alpha.mode not in ("LA", "RGBA", "PA", "La", "RGBa"):
        return im, None
    alpha = np.asarray(with_alpha.getchannel("A"))
    if alpha.min() == alpha.max():
        return im, None
    return with_alpha.convert("RGB" if with_alpha.mode in ("RGBA", "PA", "RGBa") else "L"), alpha


# -- images ------------------------------------------------------------------------------------------------
def image_array(im, path) -> np.ndarray:
    """RGB float32 (H, W, 3) in [0, 1] from a decoded Pillow image (the table in the module docstring)."""
    mode = im.mode
    if mode.startswith("I;16") or mode == "I":
        grey = np.asarray(im)
        if grey.min(initial=0) < 0 or grey.max(initial=0) > 65535:
            raise ValueError(f"image {str(path)!r}: integer pixels span {grey.min()}..{grey.max()}, outside the "
                             "16-bit range 0..65535")
        grey = grey.astype(np.float32) / 65535.0
        return np.repeat(grey[..., None], 3, axis=2)
    if mode == "F":
        grey = np.asarray(im, dtype=np.float32)
        if not np.isfinite(grey).all() or grey.min(initial=0) < 0 or grey.max(initial=0) > 1:
            raise ValueError(f"image {str(path)!r}: a float image must hold finite values in [0, 1], got "
                             f"{np.nanmin(grey)}..{np.nanmax(grey)} (rescale it)")
        return np.repeat(grey[..., None], 3, axis=2)
    if mode in ("LA", "RGBA", "PA", "La", "RGBa") or "transparency" in im.info:
        rgba = np.asarray(im.convert("RGBA"), dtype=np.float32) / 255.0
        alpha = rgba[..., 3:]
        return rgba[..., :3] * alpha + (1.0 - alpha)               # over white
    try:
        rgb = im.convert("RGB")
    except (ValueError, OSError) as e:
        raise ValueError(f"image {str(path)!r}: Pillow mode {mode!r} cannot be converted to RGB ({e})") from None
    return np.asarray(rgb, dtype=np.float32) / 255.0


def load_image(path, data: bytes | None = None) -> np.ndarray:
    """Decode an image file as RGB, upright (EXIF). Shapes: -> (H, W, 3) float32 in [0, 1].

    ``data``: the file's bytes when already read. ValueError naming the file on any problem."""
    im = open_image(path, "image", data)
    with im:
        return image_array(im, path)


# -- masks --------------------------------------------------------------------------------------------------
def _grey_rule(values: np.ndarray, full: int):
    """(object, void) boolean maps of a grey mask with full range ``full`` (255 or 65535): the rule's grey rows."""
    half = full // 2
    vmax = int(values.max(initial=0))
    if vmax > full:
        raise ValueError(f"values up to {vmax}, above the {full.bit_length()}-bit range")
    between = bool(((values > half) & (values < full)).any())
    if between:                                   # anti-aliased or any grey picture: threshold at half range
        return values > half, None
    low = bool(((values > 0) & (values <= half)).any())
    if low and vmax == full:                      # labels 1..H plus R: an index mask with R as void (VOC style)
        return (values > 0) & (values < full), values == full
    return values > 0, None                        # 0..H: an index mask; or 0/R: a binary mask


def _grey_levels_of_palette(im):
    """The grey level of each palette index when every used entry of the palette is grey, else None."""
    indices = np.asarray(im)
    palette = np.asarray(im.getpalette("RGB") or [], dtype=np.int64).reshape(-1, 3)
    used = np.unique(indices)
    if used.size and used.max() >= len(palette):
        return None
    colours = palette[used]
    if (colours[:, 0] == colours[:, 1]).all() and (colours[:, 1] == colours[:, 2]).all():
        levels = np.zeros(256, np.int64)
        levels[used] = colours[:, 0]
        return levels[indices]
    return None


def _colour_rule(im):
    """(object, void) of an opaque mask image in any mode but with alpha (see the module docstring)."""
    mode = im.mode
    if mode.startswith("I;16") or mode == "I":
        return _grey_rule(np.asarray(im).astype(np.int64), 65535)
    if mode == "P":
        levels = _grey_levels_of_palette(im)
        if levels is not None:
            return _grey_rule(levels, 255)
        indices = np.asarray(im)
        return (indices > 0) & (indices < 255), indices == 255
    if mode in ("L", "1"):
        return _grey_rule(np.asarray(im.convert("L")), 255)
    rgb = np.asarray(im.convert("RGB"))
    if (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all():
        return _grey_rule(rgb[..., 0], 255)
    void = (rgb == np.array(VOC_VOID_COLOUR, np.uint8)).all(axis=2)
    return rgb.any(axis=2) & ~void, void


def mask_array(im, path, void: str = "background") -> np.ndarray:
    """A decoded Pillow mask image -> (H, W) float32 in {0, 1} by the mask rule (module docstring)."""
    if void not in VOID_CHOICES:
        raise ValueError(f"mask void handling must be one of {VOID_CHOICES}, got {void!r}")
    colour, alpha = _alpha_varies(im)
    try:
        obj, void_map = _colour_rule(colour)
    except ValueError as e:
        raise ValueError(f"mask {str(path)!r}: {e}") from None
    if alpha is not None:
        opaque = alpha > 127
        shown = obj[opaque]
        if shown.size and shown.min() != shown.max():
            raise ValueError(f"mask {str(path)!r} is ambiguous: both its alpha channel and its colours vary among "
                             "its opaque pixels, so either could hold the object; save it as a greyscale PNG "
                             "(0 background, 255 object)")
        obj, void_map = opaque, None
    if void_map is not None and void_map.any():
        if void == "error":
            raise ValueError(f"mask {str(path)!r} has {int(void_map.sum())} void pixels (value 255/65535 in an "
                             "index mask, PASCAL VOC's border); choose what they become with --mask-void "
                             "background|object (FolderDataset(mask_void=...))")
        obj = obj | void_map if void == "object" else obj & ~void_map
    return obj.astype(np.float32)


def load_mask(path, void: str = "background", data: bytes | None = None) -> np.ndarray:
    """Decode a mask by the mask rule (module docstring), upright (EXIF). Shapes: -> (H, W) float32 in {0, 1}.

    Args:
        path: the mask file.
        void: what void pixels become: "background" (default), "object", or "error" to refuse them.
        data: the file's bytes when already read.
    """
    im = open_image(path, "mask", data)
    with im:
        return mask_array(im, path, void)
