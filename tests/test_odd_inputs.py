"""Bad and odd inputs, one parametrized case each, with the outcome a user should see.

Every file is made here with Pillow. The expected arrays are written out by hand from what a viewer shows (a
16-bit ramp is a ramp, an EXIF-rotated photo is upright, an object drawn in the alpha channel is that object),
never computed by the code under test. Errors must be one clear ValueError naming the file.

Tables: ``IMAGE_CASES`` (``load_image``), ``MASK_CASES`` (``load_mask``, the documented mask rule),
``FOLDER_CASES`` (``FolderDataset``: checked when built), ``CLI_CASES`` (one-line errors of the command).
"""
import errno
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from minideeplab.cli import main
from minideeplab.data import FolderDataset, load_image, load_mask

RAMP16 = (np.arange(64 * 16).reshape(16, 64) * 64).astype(np.uint16)        # 0 .. 65472, a left-right ramp
VOC_PALETTE = [0, 0, 0, 128, 0, 0] + [0] * (3 * 253) + [224, 224, 192]       # 0 black, 1 dark red, 255 border
ORIENTATION = 0x0112


def _exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    return exif.tobytes()


def _blocks(h=24, w=40) -> np.ndarray:
    """Solid blocks that survive JPEG: the top-left 8x16 corner white, the rest dark grey."""
    a = np.full((h, w, 3), 40, np.uint8)
    a[:8, :16] = 255
    return a


def _save(path: Path, im: Image.Image, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, **kw)
    return path


def _palette(indices: np.ndarray, palette: list, transparency=None) -> Image.Image:
    im = Image.fromarray(indices.astype(np.uint8), mode="P")
    im.putpalette(palette)
    if transparency is not None:
        im.info["transparency"] = transparency
    return im


def _rgba(rgb, alpha) -> Image.Image:
    return Image.fromarray(np.dstack([np.broadcast_to(np.asarray(rgb, np.uint8), alpha.shape + (3,)), alpha]))


SQUARE = np.zeros((6, 8), np.uint8)
SQUARE[1:4, 2:6] = 1                                                          # the object, as 0/1
OBJ = SQUARE.astype(np.float32)


def _truncated(path: Path) -> Path:
    _save(path, Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)))
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])                                  # header fine, pixels cut off
    return path


# -- images: (id, make(tmp_path) -> path, expected (H, W, 3) array or error regex, atol) -------------------------
IMAGE_CASES = [
    ("png16-grey-ramp-is-scaled-not-clipped", lambda t: _save(t / "r.png", Image.fromarray(RAMP16)),
     np.repeat((RAMP16 / 65535.0)[..., None], 3, axis=2), 1e-6),
    ("png8-grey", lambda t: _save(t / "g.png", Image.fromarray(np.array([[0, 51], [102, 255]], np.uint8))),
     np.repeat((np.array([[0, 51], [102, 255]]) / 255.0)[..., None], 3, axis=2), 1e-6),
    ("tiff-int32-in-16-bit-range", lambda t: _save(t / "i.tif", Image.fromarray(np.array([[0, 65535], [13107, 0]],
                                                                                         np.int32))),
     np.repeat(np.array([[0, 1], [0.2, 0]])[..., None], 3, axis=2), 1e-6),
    ("tiff-float-in-0-1", lambda t: _save(t / "f.tif", Image.fromarray(np.array([[0, 0.25], [0.5, 1]], np.float32))),
     np.repeat(np.array([[0, 0.25], [0.5, 1]])[..., None], 3, axis=2), 1e-7),
    ("palette-image", lambda t: _save(t / "p.png", _palette(np.array([[0, 1], [1, 0]]), [0, 0, 0, 255, 128, 0])),
     np.array([[[0, 0, 0], [1, 128 / 255, 0]], [[1, 128 / 255, 0], [0, 0, 0]]]), 1e-6),
    ("rgba-composited-over-white", lambda t: _save(t / "a.png", _rgba((255, 0, 0), np.array([[255, 0], [51, 255]],
                                                                                           np.uint8))),
     np.array([[[1, 0, 0], [1, 1, 1]], [[1, 0.8, 0.8], [1, 0, 0]]]), 1e-6),
    ("la-composited-over-white", lambda t: _save(t / "la.png", Image.fromarray(
        np.dstack([np.zeros((1, 2), np.uint8), np.array([[0, 255]], np.uint8)]), mode="LA")),
     np.array([[[1, 1, 1], [0, 0, 0]]]), 1e-6),
    ("cmyk-tiff", lambda t: _save(t / "c.tif", Image.new("CMYK", (3, 2), (255, 0, 0, 0))),
     np.broadcast_to(np.array([0.0, 1, 1]), (2, 3, 3)), 1e-6),                 # pure cyan
    ("cmyk-jpeg", lambda t: _save(t / "c.jpg", Image.new("CMYK", (16, 16), (0, 0, 0, 0))),
     np.ones((16, 16, 3)), 0.02),                                                # no ink: white
    ("exif-rotated-jpeg-is-upright", lambda t: _save(t / "e.jpg", Image.fromarray(_blocks()), exif=_exif(6),
                                                     quality=95),
     np.rot90(_blocks(), -1) / 255.0, 0.1),                                      # orientation 6: turn clockwise
    ("exif-rotated-png-is-upright", lambda t: _save(t / "e.png", Image.fromarray(_blocks()), exif=_exif(8)),
     np.rot90(_blocks(), 1) / 255.0, 1e-6),                                      # orientation 8: anticlockwise
    ("exif-mirrored-png", lambda t: _save(t / "m.png", Image.fromarray(_blocks()), exif=_exif(2)),
     _blocks()[:, ::-1] / 255.0, 1e-6),
    ("tiff-float-out-of-range", lambda t: _save(t / "f.tif", Image.fromarray(np.array([[0, 200.0]], np.float32))),
     r"f\.tif.*finite values in \[0, 1\].*rescale", None),
    ("tiff-float-nan", lambda t: _save(t / "n.tif", Image.fromarray(np.array([[0, np.nan]], np.float32))),
     r"n\.tif.*finite values", None),
    ("tiff-int32-beyond-16-bit", lambda t: _save(t / "i.tif", Image.fromarray(np.array([[0, 70000]], np.int32))),
     r"i\.tif.*outside the 16-bit range", None),
    ("truncated-png", lambda t: _truncated(t / "t.png"), r"cannot decode image .*t\.png.*corrupt or truncated", None),
    ("not-an-image", lambda t: _write(t / "x.png", b"plain text"), r"x\.png.*not a readable image", None),
    ("empty-file", lambda t: _write(t / "e.jpg", b""), r"e\.jpg.*not a readable image", None),
    ("missing-file", lambda t: t / "absent.png", r"image file not found: .*absent\.png", None),
    ("folder-named-like-an-image", lambda t: _mkdir(t / "dir.png"), r"dir\.png' is a folder, not a file", None),
]


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


@pytest.mark.parametrize("make, expected, atol", [c[1:] for c in IMAGE_CASES], ids=[c[0] for c in IMAGE_CASES])
def test_image_case(tmp_path, make, expected, atol):
    path = make(tmp_path)
    if isinstance(expected, str):
        with pytest.raises(ValueError, match=expected):
            load_image(path)
        return
    image = load_image(path)
    assert image.dtype == np.float32 and image.shape == expected.shape
    np.testing.assert_allclose(image, expected, atol=atol)


def test_png16_ramp_is_not_mostly_white(tmp_path):
    """The issue's example: a 0..65535 ramp loaded 99.6 % white when clipped at 255."""
    image = load_image(_save(tmp_path / "r.png", Image.fromarray(RAMP16)))
    assert abs(float(image.mean()) - RAMP16.mean() / 65535) < 1e-6 and (image > 0.99).mean() < 0.02


# -- masks: (id, make(tmp_path) -> path, void option, expected (H, W) {0, 1} array or error regex) ---------------
def _grey(values, bits=8):
    return Image.fromarray(np.asarray(values, np.uint16 if bits == 16 else np.uint8))


VOC = SQUARE.copy()
VOC[0, 1:7] = VOC[4, 1:7] = VOC[1:4, 1] = VOC[1:4, 6] = 255                # a void border around the object
AA = np.array([[0, 100, 127, 128, 200, 255]])                               # anti-aliased edge values

MASK_CASES = [
    ("grey-0-255", lambda t: _save(t / "m.png", _grey(SQUARE * 255)), "background", OBJ),
    ("grey-antialiased-threshold-127", lambda t: _save(t / "m.png", _grey(AA)), "background",
     np.array([[0, 0, 0, 1, 1, 1]], np.float32)),
    ("grey-0-1-index-mask", lambda t: _save(t / "m.png", _grey(SQUARE)), "background", OBJ),
    ("grey-multi-class-index-mask", lambda t: _save(t / "m.png", _grey(SQUARE * np.arange(8) % 3)), "background",
     ((SQUARE * np.arange(8) % 3) > 0).astype(np.float32)),
    ("mode-1-bilevel", lambda t: _save(t / "m.png", _grey(SQUARE * 255).convert("1")), "background", OBJ),
    ("png16-0-65535", lambda t: _save(t / "m.png", _grey(SQUARE.astype(np.uint16) * 65535, 16)), "background", OBJ),
    ("png16-threshold-at-half-range", lambda t: _save(t / "m.png", _grey([[0, 30000, 32767, 32768, 40000, 65535]],
                                                                          16)),
     "background", np.array([[0, 0, 0, 1, 1, 1]], np.float32)),
    ("png16-0-255-index", lambda t: _save(t / "m.png", _grey(SQUARE * 255, 16)), "background", OBJ),
    ("grey-voc-style-void-to-background", lambda t: _save(t / "m.png", _grey(VOC)), "background", OBJ),
    ("grey-voc-style-void-to-object", lambda t: _save(t / "m.png", _grey(VOC)), "object",
     (VOC > 0).astype(np.float32)),
    ("grey-voc-style-void-refused", lambda t: _save(t / "m.png", _grey(VOC)), "error",
     r"m\.png.* 18 void pixels.*--mask-void"),
    ("palette-voc-void-is-not-object", lambda t: _save(t / "m.png", _palette(VOC, VOC_PALETTE)), "background", OBJ),
    ("palette-voc-void-refused", lambda t: _save(t / "m.png", _palette(VOC, VOC_PALETTE)), "error", r"void pixels"),
    ("palette-black-white", lambda t: _save(t / "m.png", _palette(SQUARE, [0, 0, 0, 255, 255, 255])), "background",
     OBJ),
    ("palette-grey-levels-index-255-is-white", lambda t: _save(t / "m.png", _palette(
        SQUARE * 255, [v for i in range(256) for v in (i, i, i)])), "background", OBJ),
    ("palette-object-in-transparency", lambda t: _save(t / "m.png", _palette(SQUARE, [255, 255, 255] * 2, 0)),
     "background", OBJ),
    ("rgba-constant-colour-object-in-alpha", lambda t: _save(t / "m.png", _rgba((255, 0, 0), SQUARE * 255)),
     "background", OBJ),
    ("la-object-in-alpha", lambda t: _save(t / "m.png", Image.fromarray(
        np.dstack([np.full(SQUARE.shape, 255, np.uint8), SQUARE * 255]), mode="LA")), "background", OBJ),
    ("rgba-black-object-on-transparent-white", lambda t: _save(t / "m.png", Image.fromarray(np.dstack(
        [np.repeat((255 - SQUARE * 255)[..., None], 3, 2), SQUARE * 255]).astype(np.uint8))), "background", OBJ),
    ("rgba-opaque-alpha-ignored", lambda t: _save(t / "m.png", _grey(SQUARE * 255).convert("RGBA")), "background",
     OBJ),
    ("rgba-alpha-and-colour-both-vary-refused", lambda t: _save(t / "m.png", Image.fromarray(np.dstack(
        [np.repeat((SQUARE * 255)[..., None], 3, 2), np.where(np.arange(8) < 7, 255, 0)[None].repeat(6, 0)]
    ).astype(np.uint8))), "background", r"m\.png.*ambiguous"),
    ("rgb-coloured-object-on-black", lambda t: _save(t / "m.png", Image.fromarray(
        (SQUARE[..., None] * np.array([200, 30, 90])).astype(np.uint8))), "background", OBJ),
    ("rgb-voc-colours-border-is-void", lambda t: _save(t / "m.png", _palette(VOC, VOC_PALETTE).convert("RGB")),
     "background", OBJ),
    ("exif-rotated-mask-png", lambda t: _save(t / "m.png", _grey(SQUARE * 255), exif=_exif(6)), "background",
     np.rot90(OBJ, -1)),
    ("truncated-mask", lambda t: _truncated(t / "m.png"), "background", r"cannot decode mask .*m\.png"),
    ("mask-folder", lambda t: _mkdir(t / "m.png"), "background", r"mask .*m\.png' is a folder"),
    ("unknown-void-option", lambda t: _save(t / "m.png", _grey(SQUARE * 255)), "ignore",
     r"void handling must be one of"),
]


@pytest.mark.parametrize("make, void, expected", [c[1:] for c in MASK_CASES], ids=[c[0] for c in MASK_CASES])
def test_mask_case(tmp_path, make, void, expected):
    path = make(tmp_path)
    if isinstance(expected, str):
        with pytest.raises(ValueError, match=expected):
            load_mask(path, void=void)
        return
    mask = load_mask(path, void=void)
    assert mask.dtype == np.float32
    np.testing.assert_array_equal(mask, expected)


# -- folders: every file is checked when the dataset is built ------------------------------------------------------
def _folder(root: Path, n: int = 3, size=(24, 40)) -> Path:
    rng = np.random.default_rng(5)
    for i in range(n):
        _save(root / "images" / f"{i}.png", Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)))
        _save(root / "masks" / f"{i}.png", _grey((rng.random(size) > 0.5) * 255))
    return root


def _exif_pair(root: Path) -> Path:
    """A photo stored sideways (EXIF orientation 6) whose mask is drawn upright: they agree once upright."""
    _folder(root, 2)
    stored = _blocks()
    _save(root / "images" / "0.jpg", Image.fromarray(stored), exif=_exif(6), quality=95)
    (root / "images" / "0.png").unlink()
    upright = np.rot90(stored[..., 0] > 128, -1)
    _save(root / "masks" / "0.png", _grey(upright * 255))
    return root


FOLDER_CASES = [
    ("truncated-image", lambda r: _truncated(_folder(r) / "images" / "1.png"), r"cannot decode image .*1\.png"),
    ("truncated-mask", lambda r: _truncated(_folder(r) / "masks" / "2.png"), r"cannot decode mask .*2\.png"),
    ("size-mismatch", lambda r: _save(_folder(r) / "masks" / "0.png", _grey(np.zeros((24, 39)))),
     r"size mismatch: image '0\.png' is 40x24 but mask '0\.png' is 39x24"),
    ("folder-named-like-an-image", lambda r: _mkdir(_folder(r) / "images" / "3.png"), r"3\.png' is a folder"),
    ("folder-named-like-a-mask", lambda r: (_save(_folder(r) / "images" / "3.png", Image.new("RGB", (40, 24))),
                                            _mkdir(r / "masks" / "3.png")), r"mask .*3\.png' is a folder"),
    ("two-masks-for-one-image", lambda r: _save(_folder(r) / "masks" / "1.tif", _grey(np.zeros((24, 40)))),
     r"several masks for image '1\.png'.*1\.png, 1\.tif"),
    ("ambiguous-mask", lambda r: _save(_folder(r) / "masks" / "1.png", Image.fromarray(np.dstack(
        [np.repeat((np.eye(24, 40) * 255)[..., None], 3, 2), np.tri(24, 40) * 255]).astype(np.uint8))),
     r"1\.png.*ambiguous"),
    ("root-is-a-file", lambda r: _write(r.parent / "file", b"x"), r"is a file, not a folder"),
    ("exif-photo-with-upright-mask", _exif_pair, None),
]


@pytest.mark.parametrize("make, expected", [c[1:] for c in FOLDER_CASES], ids=[c[0] for c in FOLDER_CASES])
def test_folder_case(tmp_path, make, expected):
    root = tmp_path / "data"
    made = make(root)
    if isinstance(made, Path) and made.name == "file":
        root = made
    if expected is not None:
        with pytest.raises(ValueError, match=expected):
            FolderDataset(root)
        return
    ds = FolderDataset(root, normalize=False)
    image, mask = ds[0]
    assert image.shape == (3, 40, 24) and mask.shape == (1, 40, 24)   # upright: 24 wide, 40 high
    np.testing.assert_array_equal(mask[0] > 0.5, image[0] > 0.5)      # the white block is the object, in both


def test_verify_shows_a_progress_bar_and_fingerprints(tmp_path, capsys):
    root = _folder(tmp_path / "d", 4)
    ds = FolderDataset(root, progress=True)
    assert "checking d" in capsys.readouterr().err
    fp = ds.fingerprint()
    assert fp["files"] == 8 and fp["bytes"] == sum(p.stat().st_size for p in root.rglob("*.png"))
    same = FolderDataset(root, verify=False).fingerprint()                # computed without decoding
    assert same == fp
    mask = root / "masks" / "0.png"
    data = mask.read_bytes()
    mask.write_bytes(data[:-12] + bytes(12))                              # same size, other bytes (IEND damaged)
    assert FolderDataset(root, verify=False).fingerprint()["listing"] == fp["listing"]
    assert FolderDataset(root, verify=False).fingerprint()["content"] != fp["content"]


# -- the command line: one clear line, nothing written -------------------------------------------------------------
TINY = ["--model", "small", "--epochs", "1", "--batch-size", "2", "--quiet"]


def _one_line_error(capsys, argv, *fragments):
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 1, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err
    return err


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert main(["train", *TINY, "--image-size", "32", "--train-size", "4", "--val-size", "2", "--out", str(out)]) == 0
    return out / "last.npz"


def _bomb(t: Path, monkeypatch) -> Path:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)      # a 20x20 image is then 4x Pillow's limit
    return _save(t / "huge.png", Image.new("RGB", (20, 20)))


def _unreadable(path: Path, monkeypatch) -> Path:
    """chmod 000; as root (where chmod does not deny reads) the PermissionError is injected instead."""
    path.chmod(0)
    if os.access(path, os.R_OK):
        real = Path.read_bytes

        def denied(self):
            if self == path:
                raise PermissionError(errno.EACCES, "Permission denied", str(self))
            return real(self)
        monkeypatch.setattr(Path, "read_bytes", denied)
    return path


def _unreadable_checkpoint(t: Path, ckpt: Path, monkeypatch) -> Path:
    path = _write(t / "locked.npz", ckpt.read_bytes())
    path.chmod(0)
    if os.access(path, os.R_OK):
        import builtins

        import minideeplab.io as io_module

        def denied(file, *args, **kwargs):
            if os.fspath(file) == str(path):
                raise PermissionError(errno.EACCES, "Permission denied", str(file))
            return builtins.open(file, *args, **kwargs)
        monkeypatch.setattr(io_module, "open", denied, raising=False)
    return path


def _image(t: Path, name="x.png", size=(30, 30)) -> Path:
    return _save(t / name, Image.new("RGB", size, (90, 20, 200)))


CLI_CASES = [
    ("checkpoint-is-a-folder", lambda t, c, m: ["evaluate", _mkdir(t / "run.npz")], ["is a folder, not a checkpoint"]),
    ("checkpoint-unreadable", lambda t, c, m: ["evaluate", _unreadable_checkpoint(t, c, m)],
     ["locked.npz", "unreadable (permission denied)"]),
    ("image-is-a-folder", lambda t, c, m: ["predict", c, _mkdir(t / "photo.png"), "--out", t / "o"],
     ["photo.png' is a folder"]),
    ("image-unreadable", lambda t, c, m: ["predict", c, _unreadable(_image(t), m), "--out", t / "o"],
     ["x.png", "permission denied"]),
    ("image-decompression-bomb", lambda t, c, m: ["predict", c, _bomb(t, m), "--out", t / "o"],
     ["huge.png", "safety limit of 100 pixels"]),
    ("predict-same-name-two-folders", lambda t, c, m: ["predict", c, _image(t / "a"), _image(t / "b"), "--out",
                                                       t / "o"], ["have the same name", "x_png_mask.png"]),
    ("predict-would-overwrite-an-input", lambda t, c, m: ["predict", c, _image(t), _image(t, "x_mask.png"), "--out",
                                                          t], ["would overwrite an input image"]),
    ("predict-image-size-below-minimum", lambda t, c, m: ["predict", c, _image(t), "--out", t / "o", "--image-size",
                                                          "12"], ["--image-size 12 is too small", "at least 13x13"]),
    ("predict-own-size-below-minimum", lambda t, c, m: ["predict", c, _image(t, size=(40, 12)), "--out", t / "o",
                                                        "--image-size", "0"], ["x.png' is 40x12", "13x13"]),
    ("evaluate-image-size-below-minimum", lambda t, c, m: ["evaluate", c, "--image-size", "10"], ["at least 13x13"]),
    ("out-is-a-file", lambda t, c, m: ["predict", c, _image(t), "--out", _write(t / "f", b"")], ["is a file"]),
    *[(f"train-os32-image-size-{s}", lambda t, c, m, s=s: ["train", "--output-stride", "32", "--image-size", s, *TINY,
                                                             "--out", t / "run"],
       [f"image_size {s} is too small at output stride 32", "at least 29x29"]) for s in (16, 22, 28)],
    ("train-os8-image-size-4", lambda t, c, m: ["train", "--output-stride", "8", "--image-size", "4", *TINY,
                                                "--out", t / "run"], ["at least 5x5"]),
    ("train-truncated-val-image", lambda t, c, m: ["train", "--data", _truncated_val(t), "--image-size", "16",
                                                   *TINY, "--out", t / "run"], ["cannot decode image", "v1.png"]),
    ("train-void-refused", lambda t, c, m: ["train", "--data", _voc_folder(t), "--image-size", "16", "--mask-void",
                                            "error", *TINY, "--out", t / "run"], ["void pixels", "--mask-void"]),
]


def _truncated_val(t: Path) -> Path:
    root = t / "tv"
    _folder(root / "train", 4)
    _folder(root / "val", 2)
    _truncated(root / "val" / "images" / "1.png")
    (root / "val" / "images" / "1.png").rename(root / "val" / "images" / "v1.png")
    (root / "val" / "masks" / "1.png").rename(root / "val" / "masks" / "v1.png")
    return root


def _voc_folder(t: Path) -> Path:
    root = _folder(t / "voc", 4, size=(6, 8))
    _save(root / "masks" / "2.png", _palette(VOC, VOC_PALETTE))
    return root


@pytest.mark.parametrize("argv, fragments", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_cli_case(tmp_path, checkpoint, monkeypatch, capsys, argv, fragments):
    _one_line_error(capsys, argv(tmp_path, checkpoint, monkeypatch), *fragments)
    assert not (tmp_path / "o").exists() and not (tmp_path / "run" / "last.npz").exists()   # nothing written


def test_disk_full_while_predicting_names_the_file(tmp_path, checkpoint, monkeypatch, capsys):
    import minideeplab.io as mio

    def full(fd):            # the disk fills while the mask's temporary file is synced: the error is about that file
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(mio.os, "fsync", full)
    _one_line_error(capsys, ["predict", checkpoint, _image(tmp_path), "--out", tmp_path / "o"],
                    "x_mask.png", "No space left on device")


def test_predict_disambiguates_stems_and_writes_upright_masks(tmp_path, checkpoint, capsys):
    a, b = _image(tmp_path / "a"), _save(tmp_path / "b" / "x.jpg", Image.fromarray(_blocks()), exif=_exif(6))
    out = tmp_path / "o"
    assert main(["predict", str(checkpoint), str(a), str(b), str(a), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["x_jpg_mask.png", "x_jpg_overlay.png", "x_png_mask.png",
                                                      "x_png_overlay.png"]
    assert Image.open(out / "x_jpg_mask.png").size == (24, 40)           # upright: the stored photo is 40x24
    assert capsys.readouterr().out.count("foreground") == 2             # the file given twice is predicted once
