"""The minideeplab command: train -> evaluate -> predict round trip, resume, and one-line errors."""
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from minideeplab.backend import cuda_available
from minideeplab.cli import main
from minideeplab.io import write_npz

TINY = ["--model", "small", "--image-size", "32", "--epochs", "1", "--batch-size", "4", "--train-size", "8",
        "--val-size", "4", "--quiet"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert main(["train", *TINY, "--out", str(out)]) == 0
    return out


def _one_line_error(capsys, argv, *fragments):
    code = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code != 0
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def test_train_writes_the_run_folder(run_dir, capsys):
    names = {p.name for p in run_dir.iterdir()}
    assert {"history.csv", "last.npz", "best.npz", "curves.png", "predictions.png"} <= names


def test_evaluate_prints_the_metrics_table(run_dir, capsys):
    assert main(["evaluate", str(run_dir / "best.npz")]) == 0
    out = capsys.readouterr().out
    for name in ("iou", "dice", "precision", "recall", "accuracy"):
        assert name in out
    tp, fp, fn, tn = (int(next(line.split("|")[1] for line in out.splitlines() if line.startswith(k)))
                      for k in ("tp", "fp", "fn", "tn"))
    assert tp + fp + fn + tn == 4 * 32 * 32       # the run's 4 validation images at 32 px


def test_evaluate_on_a_folder(run_dir, tmp_path, capsys):
    rng = np.random.default_rng(0)
    for stem in ("x", "y"):
        (tmp_path / "images").mkdir(exist_ok=True)
        (tmp_path / "masks").mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40, 24, 3), dtype=np.uint8)).save(tmp_path / "images" / f"{stem}.png")
        Image.fromarray(np.full((40, 24), 255, np.uint8)).save(tmp_path / "masks" / f"{stem}.png")
    assert main(["evaluate", str(run_dir / "last.npz"), "--data", str(tmp_path), "--image-size", "16"]) == 0
    out = capsys.readouterr().out
    assert "| " in out and "iou" in out


def test_predict_writes_mask_and_overlay_at_the_image_size(run_dir, tmp_path, capsys):
    rng = np.random.default_rng(1)
    a, b = tmp_path / "a.png", tmp_path / "b.jpg"
    Image.fromarray(rng.integers(0, 256, (37, 50, 3), dtype=np.uint8)).save(a)
    Image.fromarray(rng.integers(0, 256, (90, 70), dtype=np.uint8)).save(b)       # greyscale JPEG
    out = tmp_path / "pred"
    assert main(["predict", str(run_dir / "last.npz"), str(a), str(b), "--out", str(out)]) == 0
    for stem, (w, h) in (("a", (50, 37)), ("b", (70, 90))):
        mask = Image.open(out / f"{stem}_mask.png")
        overlay = Image.open(out / f"{stem}_overlay.png")
        assert mask.size == overlay.size == (w, h)
        assert mask.mode == "L" and set(np.unique(np.asarray(mask))) <= {0, 255}
        assert overlay.mode == "RGB"
    assert main(["predict", str(run_dir / "last.npz"), str(a), "--out", str(out), "--image-size", "0"]) == 0
    assert "a.png" in capsys.readouterr().out


def test_predict_threshold_is_strict_like_model_predict(run_dir, tmp_path):
    """A pixel is foreground when its probability is > threshold (``DeepLabV3.predict``, ``ConfusionMeter``):
    a saturated model (probability exactly 1.0) with --threshold 1 predicts no foreground."""
    from minideeplab import io
    from minideeplab.checkpoint import load_model
    model, meta = load_model(run_dir / "last.npz")
    classifier = model.head.classifier
    classifier.weight.data[...] = 0
    classifier.bias.data[...] = 50                      # sigmoid(50) is exactly 1.0 in float32
    io.save(model, tmp_path / "saturated.npz", {"train_config": meta["train_config"]})
    image = np.random.default_rng(3).integers(0, 256, (20, 24, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "s.png")
    x = np.zeros((1, 3, 20, 24), np.float32)
    assert not model.predict(x, threshold=1.0).any() and model.predict_proba(x).min() == 1.0
    for size in ("0", "32"):       # at the image's own size, and resized from the network size
        assert main(["predict", str(tmp_path / "saturated.npz"), str(tmp_path / "s.png"), "--out",
                     str(tmp_path / size), "--threshold", "1", "--image-size", size]) == 0
        assert not np.asarray(Image.open(tmp_path / size / "s_mask.png")).any()


def test_resume_continues_the_run(run_dir, tmp_path, capsys):
    from minideeplab.train import TrainConfig, Trainer
    first = tmp_path / "first"
    cfg = TrainConfig(model="small", image_size=32, epochs=2, batch_size=4, train_size=8, val_size=4)
    trainer = Trainer(cfg, out_dir=first, progress=False)
    trainer.on_step_end = lambda t: t.request_stop()      # a 2-epoch run stopped after its first step
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    out = tmp_path / "more"
    assert main(["train", "--resume", str(first / "last.npz"), "--out", str(out), "--quiet"]) == 0
    assert "resuming" in capsys.readouterr().out
    assert {"last.npz", "best.npz", "history.csv"} <= {p.name for p in out.iterdir()}
    assert main(["train", "--resume", str(out / "last.npz"), "--quiet"]) == 0
    assert "already finished" in capsys.readouterr().out
    _one_line_error(capsys, ["train", "--resume", str(run_dir / "last.npz"), "--lr", "0.1"],
                    "--resume continues a run with its saved settings", "--lr")


def test_error_paths_are_one_line(run_dir, tmp_path, capsys):
    ckpt = str(run_dir / "last.npz")
    _one_line_error(capsys, ["train", "--output-stride", "7"], "invalid choice: 7")
    _one_line_error(capsys, ["train", "--epochs", "zero"], "--epochs", "expected a int")
    _one_line_error(capsys, ["train", "--loss", "l2", *TINY[:-1]], "unknown loss 'l2'")
    _one_line_error(capsys, ["train", "--data", str(tmp_path / "missing"), *TINY],
                    "dataset folder not found")
    _one_line_error(capsys, ["frobnicate"], "invalid choice")
    _one_line_error(capsys, ["evaluate", str(tmp_path / "nope.npz")], "no such checkpoint file")
    (tmp_path / "text.npz").write_text("not a zip")
    _one_line_error(capsys, ["evaluate", str(tmp_path / "text.npz")], "not a readable .npz archive")
    np.savez(tmp_path / "plain.npz", w=np.zeros(3))
    _one_line_error(capsys, ["evaluate", str(tmp_path / "plain.npz")], "not a minideeplab checkpoint")
    write_npz(tmp_path / "noconfig.npz", {"w": np.zeros(3)}, {"kind": "something"})
    _one_line_error(capsys, ["predict", str(tmp_path / "noconfig.npz"), ckpt, "--out", str(tmp_path)],
                    "no model config")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG garbage")
    _one_line_error(capsys, ["predict", ckpt, str(tmp_path / "corrupt.png"), "--out", str(tmp_path / "o")],
                    "corrupt.png", "not a readable image")
    _one_line_error(capsys, ["predict", ckpt, str(tmp_path / "absent.png"), "--out", str(tmp_path / "o")],
                    "image file not found")
    assert not (tmp_path / "o").exists()          # nothing written when an input is bad
    if not cuda_available():
        _one_line_error(capsys, ["train", "--device", "cuda", *TINY], "device 'cuda' requested")


def test_bench_dispatches_or_fails_cleanly(capsys, monkeypatch):
    from minideeplab import cli
    calls = []

    class FakeBench:
        @staticmethod
        def main(argv):
            calls.append(argv)
            return 0
    monkeypatch.setitem(sys.modules, "minideeplab.bench", FakeBench)
    monkeypatch.setattr("minideeplab.bench", FakeBench, raising=False)
    assert cli.main(["bench", "--quick", "x"]) == 0
    assert calls == [["--quick", "x"]]
    monkeypatch.setitem(sys.modules, "minideeplab.bench", None)        # import now fails like a missing module
    monkeypatch.delattr("minideeplab.bench", raising=False)
    _one_line_error(capsys, ["bench"], "bench")


def test_console_entry_point_error_has_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "minideeplab.cli", "train", "--image-size", "-3"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert "--image-size" in proc.stderr


def test_train_on_a_folder(tmp_path, capsys):
    rng = np.random.default_rng(2)
    for d in ("images", "masks"):
        (tmp_path / "data" / d).mkdir(parents=True)
    for i in range(6):
        image = rng.integers(0, 256, (30 + i, 26, 3), dtype=np.uint8)          # sizes differ: --image-size
        Image.fromarray(image).save(tmp_path / "data" / "images" / f"{i}.jpg")
        Image.fromarray((image[..., 0] > 127).astype(np.uint8) * 255).save(tmp_path / "data" / "masks" / f"{i}.png")
    out = tmp_path / "run"
    argv = ["train", "--data", str(tmp_path / "data"), "--model", "small", "--image-size", "24", "--epochs", "1",
            "--batch-size", "2", "--quiet", "--out", str(out)]
    assert main(argv) == 0
    assert "validation after 1 epoch" in capsys.readouterr().out
    assert (out / "best.npz").is_file()
