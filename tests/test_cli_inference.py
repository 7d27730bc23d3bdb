"""``evaluate`` and ``predict`` with the inference options: ``--output-stride`` (the same weights at another output
stride), ``--scales``/``--multi-scale`` and ``--flip``. The printed numbers are compared with the same evaluation
done through the API by hand (``set_output_stride``, ``inference.predict_proba``), never with themselves."""
import numpy as np
import pytest
from PIL import Image

from minideeplab import io
from minideeplab.checkpoint import load_model
from minideeplab.cli import main
from minideeplab.data import DataLoader, SyntheticShapes, load_image
from minideeplab.data.transforms import normalize
from minideeplab.inference import PAPER_SCALES, evaluate_model, predict_proba
from minideeplab.models import set_output_stride
from minideeplab.train import evaluate

TINY = ["--model", "small", "--image-size", "32", "--epochs", "1", "--batch-size", "4", "--train-size", "8",
        "--val-size", "4", "--quiet"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert main(["train", *TINY, "--out", str(out)]) == 0
    return out / "last.npz"


def printed(out: str) -> dict:
    """The ``metric | value`` rows of ``format_metrics`` as numbers."""
    rows = {}
    for line in out.splitlines():
        parts = [p.strip() for p in line.split("|")]
        if len(parts) == 2 and parts[0] != "metric":
            rows[parts[0]] = float(parts[1])
    return rows


def val_loader(meta):
    cfg = meta["train_config"]          # the run's validation set, as evaluate picks it by default
    return DataLoader(SyntheticShapes(cfg["val_size"], cfg["image_size"], seed=cfg["seed"], split=1), 8)


def one_line_error(capsys, argv, *fragments, code=1):
    assert main(argv) == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err


def test_evaluate_at_another_output_stride(ckpt, capsys):
    assert main(["evaluate", str(ckpt), "--output-stride", "8"]) == 0
    out = capsys.readouterr().out
    assert "output stride 8 (trained at 16)" in out.splitlines()[0]
    got = printed(out)
    model, meta = load_model(ckpt)
    set_output_stride(model, 8)
    assert model.head.aspp.rates == (12, 24, 36)
    expected = evaluate(model, val_loader(meta))                # the same weights switched by hand
    for k in ("iou", "dice", "boundary_iou", "trimap_iou_1px", "trimap_iou_16px", "tp", "fp"):
        assert got[k] == pytest.approx(expected[k], abs=6e-5), k       # printed with 4 decimals
    assert "loss" in got
    plain = printed((main(["evaluate", str(ckpt)]), capsys.readouterr().out)[1])
    assert (plain["tp"], plain["fp"]) != (got["tp"], got["fp"])         # the option changed the network
    model16, _ = load_model(ckpt)
    assert plain["tp"] == evaluate(model16, val_loader(meta))["tp"]


def test_evaluate_with_scales_and_flip(ckpt, capsys):
    assert main(["evaluate", str(ckpt), "--scales", "0.75,1.25", "--flip", "--output-stride", "8"]) == 0
    out = capsys.readouterr().out
    title = out.splitlines()[0]
    assert "scales 0.75,1.25, flip" in title and "no loss" in title
    got = printed(out)
    assert "loss" not in got and "seconds_per_image" not in got
    model, meta = load_model(ckpt)
    expected = evaluate_model(model, val_loader(meta), scales=(0.75, 1.25), flip=True, output_stride=8)
    for k in ("iou", "boundary_iou", "trimap_iou_2px", "tp", "fn"):
        assert got[k] == pytest.approx(expected[k], abs=6e-5), k
    assert main(["evaluate", str(ckpt), "--multi-scale"]) == 0
    multi = capsys.readouterr().out
    assert "scales 0.5,0.75,1,1.25,1.5,1.75" in multi.splitlines()[0]
    expected = evaluate_model(load_model(ckpt)[0], val_loader(meta), scales=PAPER_SCALES)
    assert printed(multi)["tp"] == expected["tp"]


def test_predict_with_the_options_writes_what_the_api_predicts(ckpt, tmp_path, capsys):
    image = np.random.default_rng(4).integers(0, 256, (32, 32, 3), dtype=np.uint8)    # the network's size: no resize
    Image.fromarray(image).save(tmp_path / "a.png")
    argv = ["predict", str(ckpt), str(tmp_path / "a.png"), "--out", str(tmp_path / "p"), "--output-stride", "8",
            "--flip", "--scales", "1,1.5", "--threshold", "0.45"]
    assert main(argv) == 0
    assert "predicting with output stride 8 (trained at 16), scales 1,1.5, flip" in capsys.readouterr().out
    mask = np.asarray(Image.open(tmp_path / "p" / "a_mask.png")) > 0
    model, _ = load_model(ckpt)
    set_output_stride(model, 8)
    x = np.transpose(normalize(load_image(tmp_path / "a.png")), (2, 0, 1))[None].copy()
    expected = predict_proba(model, x, (1.0, 1.5), flip=True)[0, 0] > 0.45
    np.testing.assert_array_equal(mask, expected)
    plain = predict_proba(load_model(ckpt)[0], x)[0, 0] > 0.45
    assert (expected != plain).any()                             # the options change the mask


def test_bad_options_are_one_line_errors(ckpt, tmp_path, capsys):
    one_line_error(capsys, ["evaluate", str(ckpt), "--scales", "0.5,0"], "every scale must be a positive number",
                   code=2)
    one_line_error(capsys, ["evaluate", str(ckpt), "--scales", "half"], "expected comma-separated numbers", code=2)
    one_line_error(capsys, ["evaluate", str(ckpt), "--scales", "1", "--multi-scale"], "not allowed with", code=2)
    one_line_error(capsys, ["predict", str(ckpt), "x.png", "--out", str(tmp_path), "--output-stride", "4"],
                   "invalid choice: 4", code=2)
    # a scale that makes the network input smaller than the network's minimum (13 px at output stride 16)
    one_line_error(capsys, ["evaluate", str(ckpt), "--scales", "0.25,1"],
                   "scale 0.25 of --image-size (32x32 pixels) gives a 8x8 network input", "minimum 13x13")
    Image.fromarray(np.zeros((40, 30, 3), np.uint8)).save(tmp_path / "b.png")
    one_line_error(capsys, ["predict", str(ckpt), str(tmp_path / "b.png"), "--out", str(tmp_path / "o"),
                            "--image-size", "0", "--scales", "0.4"], "scale 0.4 of image", "12x16 network input")
    one_line_error(capsys, ["predict", str(ckpt), str(tmp_path / "b.png"), "--out", str(tmp_path / "o"),
                            "--output-stride", "32", "--image-size", "20"], "--image-size 20 is too small",
                   "29x29")
    assert not (tmp_path / "o").exists()
    # ASPP rates that would not be whole numbers at the new output stride
    model, meta = load_model(ckpt)
    from minideeplab.models import DeepLabConfig, build_deeplab
    odd = build_deeplab(DeepLabConfig.small(rates=(1, 2, 3)), rng=np.random.default_rng(0))
    io.save(odd, tmp_path / "odd.npz", {"train_config": meta["train_config"]})
    one_line_error(capsys, ["evaluate", str(tmp_path / "odd.npz"), "--output-stride", "32"],
                   "--output-stride 32: the checkpoint's network (output stride 16, ASPP rates (1, 2, 3)) cannot be "
                   "switched", "rate 1 at output stride 16 becomes 0.5 at 32, not a whole number")


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
@pytest.mark.parametrize("command", ["predict", "evaluate"])
def test_non_finite_logits_are_refused_with_the_options(ckpt, tmp_path, capsys, command):
    model, meta = load_model(ckpt)
    model.head.classifier.bias.data[...] = np.inf       # every logit +Inf: sigmoid would give a clean 1.0
    io.save(model, tmp_path / "inf.npz", {"train_config": meta["train_config"]})
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "x.png")
    argv = ([command, str(tmp_path / "inf.npz"), str(tmp_path / "x.png"), "--out", str(tmp_path / "p")]
            if command == "predict" else [command, str(tmp_path / "inf.npz")])
    one_line_error(capsys, argv + ["--flip", "--scales", "1,1.5"], "logits) is not finite", "at scale 1")
    assert not (tmp_path / "p").exists() or not list((tmp_path / "p").iterdir())
