"""A run remembers its data: evaluate scores the run's own validation set by default, resume refuses changed data,
a relative --data path is stored absolute."""
import numpy as np
import pytest
from PIL import Image

from minideeplab.cli import main
from minideeplab.data.run_data import evaluation_set
from minideeplab.train import TrainConfig, Trainer

SIZE = 16


def _folder(root, n, seed=0):
    rng = np.random.default_rng(seed)
    for d in ("images", "masks"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        image = rng.integers(0, 256, (20, 18, 3), dtype=np.uint8)
        Image.fromarray(image).save(root / "images" / f"{i:02d}.png")
        Image.fromarray((image[..., 1] > 127).astype(np.uint8) * 255).save(root / "masks" / f"{i:02d}.png")
    return root


def _counts(out: str) -> int:
    return sum(int(next(line.split("|")[1] for line in out.splitlines() if line.startswith(k)))
               for k in ("tp", "fp", "fn", "tn"))


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    """A run trained on a single folder of 10 pairs: 2 for validation (val_fraction 0.2), 8 for training."""
    base = tmp_path_factory.mktemp("folder_run")
    data, out = _folder(base / "data", 10), base / "run"
    assert main(["train", "--data", str(data), "--model", "small", "--image-size", str(SIZE), "--epochs", "1",
                 "--batch-size", "2", "--quiet", "--out", str(out)]) == 0
    return data, out


@pytest.mark.parametrize("extra, pairs, words", [
    ([], 2, "validation split (2 of 10 pairs"),              # no --data: the run's folder and its split
    (["--split", "train"], 8, "training split (8 of 10 pairs"),
    (["--split", "all"], 10, "all 10 pairs"),
])
def test_evaluate_defaults_to_the_runs_folder_and_split(folder_run, capsys, extra, pairs, words):
    _, out = folder_run
    assert main(["evaluate", str(out / "last.npz"), *extra]) == 0
    printed = capsys.readouterr().out
    assert words in printed and "loss: bce+dice" in printed
    assert _counts(printed) == pairs * SIZE * SIZE
    loss = float(next(line.split("|")[1] for line in printed.splitlines() if line.startswith("loss")))
    assert np.isfinite(loss) and loss > 0


def test_evaluate_val_split_is_the_one_the_run_validated_on(folder_run):
    data, out = folder_run
    trainer = Trainer.from_checkpoint(out / "last.npz", out_dir=out / "unused", progress=False)
    dataset, _ = evaluation_set(trainer.cfg)
    assert dataset.indices == trainer.val_set.indices
    for i in range(len(dataset)):
        np.testing.assert_array_equal(dataset[i][1], trainer.val_set[i][1])


def test_evaluate_another_folder_scores_all_of_it_and_a_copy_counts_as_the_run(folder_run, tmp_path, capsys):
    data, out = folder_run
    other = _folder(tmp_path / "other", 5, seed=9)
    assert main(["evaluate", str(out / "last.npz"), "--data", str(other)]) == 0
    printed = capsys.readouterr().out
    assert "all 5 pairs" in printed and _counts(printed) == 5 * SIZE * SIZE
    copy = _folder(tmp_path / "copy", 10)                    # the same files elsewhere: the run's data
    assert main(["evaluate", str(out / "last.npz"), "--data", str(copy)]) == 0
    assert "validation split (2 of 10 pairs" in capsys.readouterr().out


def test_evaluate_synthetic_run_scores_its_validation_images(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--model", "small", "--image-size", str(SIZE), "--epochs", "1", "--batch-size", "2",
                 "--train-size", "4", "--val-size", "3", "--quiet", "--out", str(out)]) == 0
    capsys.readouterr()
    for extra, n in (([], 3), (["--split", "train"], 4), (["--split", "all"], 7)):
        assert main(["evaluate", str(out / "best.npz"), *extra]) == 0
        printed = capsys.readouterr().out
        assert "SyntheticShapes" in printed and _counts(printed) == n * SIZE * SIZE


def _stopped_run(data, out):
    cfg = TrainConfig(data=str(data), model="small", image_size=SIZE, batch_size=2, epochs=2)
    trainer = Trainer(cfg, out_dir=out, progress=False, figures=False)
    trainer.on_step_end = lambda t: t.request_stop()
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    return out / "last.npz"


def _add_pair(data):
    _folder(data, 11)


def _same_size_other_bytes(data):
    mask = data / "masks" / "03.png"
    mask.write_bytes(mask.read_bytes()[:-12] + bytes(12))


def _rename_pair(data):
    for d in ("images", "masks"):
        (data / d / "04.png").rename(data / d / "x4.png")


@pytest.mark.parametrize("change, words", [
    (_add_pair, "20 files"),
    (_same_size_other_bytes, "same file names and sizes, but different contents"),
    (_rename_pair, "as many files and bytes, but other names or sizes"),
])
def test_resume_refuses_a_changed_dataset(tmp_path, capsys, change, words):
    data = _folder(tmp_path / "data", 10)
    ckpt = _stopped_run(data, tmp_path / "run")
    change(data)
    code = main(["train", "--resume", str(ckpt), "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert "cannot resume" in err and "changed since the run started" in err and words in err, err


def test_resume_on_unchanged_data_works_and_a_relative_path_is_stored_absolute(tmp_path, monkeypatch, capsys):
    _folder(tmp_path / "work" / "data", 10)
    monkeypatch.chdir(tmp_path / "work")
    cfg = TrainConfig(data="data")
    assert cfg.data == str(tmp_path / "work" / "data")
    ckpt = _stopped_run("data", tmp_path / "run")
    monkeypatch.chdir(tmp_path)                                   # elsewhere: the stored path still finds it
    assert main(["train", "--resume", str(ckpt), "--quiet"]) == 0
    assert "validation after 2 epoch" in capsys.readouterr().out


def test_evaluate_says_when_the_runs_folder_is_gone(tmp_path, capsys):
    data = _folder(tmp_path / "data", 10)
    ckpt = _stopped_run(data, tmp_path / "run")
    data.rename(tmp_path / "moved")
    assert main(["evaluate", str(ckpt)]) == 1
    err = capsys.readouterr().err
    assert "the run's data folder" in err and "is not there any more; name the data with --data" in err
    assert main(["evaluate", str(ckpt), "--data", str(tmp_path / "moved")]) == 0
    assert "validation split (2 of 10 pairs" in capsys.readouterr().out     # the run's files, found by fingerprint


@pytest.mark.parametrize("split, n, words", [(None, 2, "validation images (2)"), ("train", 3, "training images (3)"),
                                             ("all", 5, "training + validation images (5)")])
def test_evaluation_set_of_a_train_val_folder(tmp_path, split, n, words):
    _folder(tmp_path / "tv" / "train", 3)
    _folder(tmp_path / "tv" / "val", 2, seed=1)
    cfg = TrainConfig(data=str(tmp_path / "tv"), image_size=SIZE)
    for data in (None, str(tmp_path / "tv")):                 # the run's own, or named: val/ unless told
        dataset, label = evaluation_set(cfg, data, split)
        assert len(dataset) == n and words in label
        assert dataset[n - 1][0].shape == (3, SIZE, SIZE)
