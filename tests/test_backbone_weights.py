"""``minideeplab train --backbone-weights PTH`` (``TrainConfig.backbone_weights``): torchvision's DenseNet-121
weights in the backbone before training, kept out of a resumed run, and one-line errors for a wrong file."""
import re

import numpy as np
import pytest
from test_io import _torchvision_like_state_dict

from minideeplab.checkpoint import load_checkpoint
from minideeplab.cli import main
from minideeplab.train import TrainConfig, Trainer

RUN = {"model": "densenet121", "output_stride": 32, "image_size": 32, "batch_size": 2, "train_size": 2,
       "val_size": 2, "epochs": 2, "augment": False}


def _tv_key(key):
    """Our backbone's key of a torchvision key (legacy ``norm.1`` names aside, they are the same)."""
    return re.sub(r"(denselayer\d+\.(?:norm|relu|conv))\.([12])\.", r"\1\2.", key)


@pytest.fixture(scope="module")
def pth(tmp_path_factory):
    torch = pytest.importorskip("torch")
    state = _torchvision_like_state_dict(torch, legacy=True)     # as the ImageNet file: legacy names, classifier
    path = tmp_path_factory.mktemp("weights") / "densenet121.pth"
    torch.save(state, path)
    return path, {_tv_key(k): v.numpy() for k, v in state.items() if not k.startswith("classifier.")}


def test_new_run_starts_from_the_file_and_a_resumed_one_keeps_its_weights(pth, tmp_path):
    path, expected = pth
    trainer = Trainer(TrainConfig(**RUN, backbone_weights=str(path)), out_dir=tmp_path, progress=False,
                      figures=False)
    own = trainer.model.backbone.state_dict()
    for k, v in expected.items():
        np.testing.assert_array_equal(own[k], v.astype(own[k].dtype), err_msg=k)
    trainer.on_step_end = lambda t: t.request_stop()          # one step: the weights move away from the file's
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    saved = load_checkpoint(tmp_path / "last.npz")
    assert saved.meta["train_config"]["backbone_weights"] == str(path)
    conv0 = "backbone.features.conv0.weight"
    assert not np.array_equal(saved.model_state[conv0], expected["features.conv0.weight"])
    resumed = Trainer.from_checkpoint(tmp_path / "last.npz", progress=False, figures=False)
    np.testing.assert_array_equal(resumed.model.state_dict()[conv0], saved.model_state[conv0])   # not the file's


def test_resume_does_not_need_the_file(pth, tmp_path):
    path, _ = pth
    copy = tmp_path / "copy.pth"
    copy.write_bytes(path.read_bytes())
    trainer = Trainer(TrainConfig(**RUN, backbone_weights=str(copy)), out_dir=tmp_path, progress=False,
                      figures=False)
    trainer.save(tmp_path / "last.npz")
    copy.unlink()
    Trainer.from_checkpoint(tmp_path / "last.npz", progress=False, figures=False)       # no error


def test_cli_backbone_weights_errors_are_one_line(pth, tmp_path, capsys):
    path, _ = pth
    small = ["train", "--model", "small", "--image-size", "32", "--epochs", "1", "--batch-size", "2",
             "--train-size", "2", "--val-size", "2", "--quiet", "--out", str(tmp_path / "run")]
    assert main(small + ["--backbone-weights", str(path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "backbone_weights (torchvision's DenseNet-121) needs model 'densenet121'" in err[0]
    not_torch = tmp_path / "notes.pth"
    not_torch.write_text("not a checkpoint")
    dense = [a if a != "small" else "densenet121" for a in small]
    for bad, fragment in ((not_torch, f"{str(not_torch)!r} is not a PyTorch checkpoint"),
                          (tmp_path / "missing.pth", "missing.pth")):
        assert main(dense + ["--backbone-weights", str(bad)]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "Traceback" not in err[0] and fragment in err[0], err
    assert not (tmp_path / "run" / "last.npz").exists()


def test_cli_no_cuda_graph_is_a_run_setting(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--model", "small", "--image-size", "32", "--epochs", "1", "--batch-size", "4",
                 "--train-size", "4", "--val-size", "4", "--quiet", "--no-cuda-graph", "--out", str(out)]) == 0
    assert load_checkpoint(out / "last.npz").meta["train_config"]["cuda_graph"] is False
    assert TrainConfig().cuda_graph is True
