"""Weights in and out: npz round trips, atomic writes, clear errors, torchvision import, export to PyTorch."""
import json
import os
import re

import numpy as np
import pytest

from minideeplab import io
from minideeplab.models import DeepLabConfig, build_deeplab, densenet121


def small(os_=16, dtype=np.float32, seed=0, **kw):
    return build_deeplab(DeepLabConfig.small(output_stride=os_, **kw), rng=np.random.default_rng(seed), dtype=dtype)


# -- write_npz / read_npz -------------------------------------------------------------------------------------
def test_npz_round_trip(tmp_path):
    arrays = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "n": np.array(7, np.int64),
              "v": np.linspace(0, 1, 5)}
    io.write_npz(tmp_path / "a.npz", arrays, {"epoch": 3, "note": "é"})
    got, meta = io.read_npz(tmp_path / "a.npz")
    assert list(got) == ["w", "n", "v"]
    for k, v in arrays.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape
        np.testing.assert_array_equal(got[k], v)
    assert meta == {"epoch": 3, "note": "é", "format_version": 1}
    with np.load(tmp_path / "a.npz", allow_pickle=False) as f:   # plain npz, no pickles
        assert json.loads(str(f[io.META_KEY]))["epoch"] == 3


def test_npz_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.npz"
    io.write_npz(path, {"a": np.ones(3)}, {"version": "old"})

    def crash(f, **arrays):
        f.write(b"PK\x03\x04 half a file")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", crash)
    with pytest.raises(OSError, match="disk full"):
        io.write_npz(path, {"a": np.zeros(3)}, {"version": "new"})
    monkeypatch.undo()
    arrays, meta = io.read_npz(path)   # the old checkpoint is intact
    assert meta["version"] == "old"
    np.testing.assert_array_equal(arrays["a"], np.ones(3))
    assert os.listdir(tmp_path) == ["ckpt.npz"]   # and no temporary file is left behind


def test_atomic_write_text_creates_folder_and_keeps_old_file_on_error(tmp_path):
    """The one writer behind checkpoints, history.csv, PNGs and benchmark results."""
    path = tmp_path / "new" / "history.csv"
    with io.atomic_write(path, "w", newline="") as f:
        f.write("epoch\n1\n")
    assert path.read_text() == "epoch\n1\n"
    with pytest.raises(KeyboardInterrupt):
        with io.atomic_write(path, "w") as f:
            f.write("epoch\n")
            raise KeyboardInterrupt
    assert path.read_text() == "epoch\n1\n"
    assert os.listdir(path.parent) == ["history.csv"]


def test_npz_bad_files_give_value_errors_naming_the_file(tmp_path):
    with pytest.raises(ValueError, match=r"no such checkpoint file: .*missing\.npz"):
        io.read_npz(tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip at all")
    with pytest.raises(ValueError, match=r"junk\.npz' is not a readable \.npz archive \(not a zip file") as err:
        io.read_npz(tmp_path / "junk.npz")
    assert "pickle" not in str(err.value)   # np.load's own guess (pickled data) would mislead
    io.write_npz(tmp_path / "good.npz", {"a": np.ones(100)})
    data = (tmp_path / "good.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut\.npz' is not a readable \.npz archive"):
        io.read_npz(tmp_path / "cut.npz")
    np.savez(tmp_path / "foreign.npz", a=np.ones(2))
    with pytest.raises(ValueError, match=r"foreign\.npz' is a \.npz archive but not a minideeplab checkpoint"):
        io.read_npz(tmp_path / "foreign.npz")
    with pytest.raises(ValueError, match="reserved"):
        io.write_npz(tmp_path / "x.npz", {io.META_KEY: np.ones(1)})
    with pytest.raises(TypeError, match="not JSON-serialisable"):
        io.write_npz(tmp_path / "x.npz", {"a": np.ones(1)}, {"bad": object()})


# -- save / load / load_model ---------------------------------------------------------------------------------
def test_save_load_round_trip_restores_outputs(tmp_path):
    model = small(8)
    x = np.random.default_rng(1).standard_normal((2, 3, 40, 40)).astype(np.float32)
    model(x)   # move the running statistics away from their initial values
    model.eval()
    expected = model(x)
    io.save(model, tmp_path / "m.npz", meta={"epoch": 5})

    other = small(8, seed=99).eval()
    assert not np.allclose(other(x), expected)
    meta = io.load(other, tmp_path / "m.npz")
    assert meta["epoch"] == 5 and meta["config"]["output_stride"] == 8
    np.testing.assert_array_equal(other(x), expected)

    rebuilt = io.load_model(tmp_path / "m.npz").eval()
    assert rebuilt.config == model.config and rebuilt.output_stride == 8
    assert rebuilt.head.classifier.weight.data.dtype == np.float32
    np.testing.assert_array_equal(rebuilt(x), expected)
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(rebuilt.state_dict()[k], v)
    as64 = io.load_model(tmp_path / "m.npz", dtype=np.float64)
    assert as64.head.classifier.weight.data.dtype == np.float64


def test_load_other_architecture_names_keys_and_shapes(tmp_path):
    io.save(small(16), tmp_path / "small.npz")
    wider = small(16, growth_rate=12)
    with pytest.raises(ValueError, match=r"small\.npz.*shape mismatches.*"
                                         r"backbone\.features\.denseblock1\.denselayer1\.conv1\.weight: "
                                         r"model \(24, 16, 1, 1\) vs file \(16, 16, 1, 1\)"):
        io.load(wider, tmp_path / "small.npz")
    deeper = small(16, block_config=(2, 2, 3, 2))
    with pytest.raises(ValueError, match=r"keys missing from the file \(backbone\.features\.denseblock3\.denselayer3"):
        io.load(deeper, tmp_path / "small.npz")
    two_classes = small(16, num_classes=2)
    with pytest.raises(ValueError, match=r"head\.classifier\.weight: model \(2, 16, 1, 1\) vs file \(1, 16, 1, 1\)"):
        io.load(two_classes, tmp_path / "small.npz")


def test_load_other_output_stride_is_refused_unless_asked(tmp_path):
    io.save(small(16), tmp_path / "os16.npz")
    os8 = small(8, seed=3)
    with pytest.raises(ValueError, match=r"config differs \(output_stride: model 8 vs file 16\); "
                                         r"pass check_config=False"):
        io.load(os8, tmp_path / "os16.npz")
    io.load(os8, tmp_path / "os16.npz", check_config=False)   # same shapes: allowed on purpose
    np.testing.assert_array_equal(os8.backbone.features.conv0.weight.data,
                                  small(16).backbone.features.conv0.weight.data)


def test_load_reads_training_checkpoints(tmp_path):
    # runs/*/best.npz is what training leaves behind: io.load must read it too, config check included
    from minideeplab.checkpoint import save_checkpoint

    trained = small(16, seed=5)
    save_checkpoint(tmp_path / "best.npz", trained, meta={"epoch": 2}, extra={"epoch_order": np.arange(4)})
    same = small(16, seed=6)
    assert io.load(same, tmp_path / "best.npz")["epoch"] == 2
    for k, v in trained.state_dict().items():
        np.testing.assert_array_equal(same.state_dict()[k], v)
    os8 = small(8, seed=3)
    with pytest.raises(ValueError, match=r"best\.npz.*config differs \(output_stride: model 8 vs file 16\)"):
        io.load(os8, tmp_path / "best.npz")
    io.load(os8, tmp_path / "best.npz", check_config=False)
    np.testing.assert_array_equal(os8.head.classifier.weight.data, trained.head.classifier.weight.data)


def test_load_model_without_config(tmp_path):
    io.write_npz(tmp_path / "bare.npz", {"a": np.ones(2)}, {})
    with pytest.raises(ValueError, match=r"bare\.npz' has no model config"):
        io.load_model(tmp_path / "bare.npz")


def test_export_state_dict_is_a_detached_copy():
    model = small(32)
    exported = io.export_state_dict(model)
    assert list(exported) == list(model.state_dict())
    assert all(isinstance(v, np.ndarray) for v in exported.values())
    exported["head.classifier.bias"][...] = 42
    assert not np.any(model.head.classifier.bias.data == 42)


# -- torchvision import ---------------------------------------------------------------------------------------
LEGACY = re.compile(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.")


def _torchvision_like_state_dict(torch, legacy):
    """Random weights under torchvision's densenet121 keys (features.* from the fixture) plus its classifier."""
    from minideeplab.torch_oracle import TorchDenseNet

    tv = TorchDenseNet(DeepLabConfig(output_stride=32))   # a torch module shaped like torchvision's features
    gen = torch.Generator().manual_seed(0)
    state = {}
    for k, v in tv.state_dict().items():
        if k.endswith("num_batches_tracked"):
            if legacy:     # old checkpoints predate num_batches_tracked
                continue
            value = torch.tensor(17)
        elif k.endswith("running_var"):
            value = torch.rand(v.shape, generator=gen) + 0.5
        else:
            value = torch.randn(v.shape, generator=gen)
        state[LEGACY.sub(r"\1.\2.", k) if legacy else k] = value
    state["classifier.weight"] = torch.randn(1000, 1024, generator=gen)
    state["classifier.bias"] = torch.randn(1000, generator=gen)
    return state


@pytest.mark.parametrize("legacy", [False, True])
def test_import_torchvision_densenet121(tmp_path, legacy):
    torch = pytest.importorskip("torch")
    state = _torchvision_like_state_dict(torch, legacy)
    if legacy:
        assert "features.denseblock2.denselayer3.norm.1.weight" in state
        assert "features.denseblock2.denselayer3.conv.2.weight" in state
    torch.save(state, tmp_path / "densenet121.pth")

    model = build_deeplab(DeepLabConfig(output_stride=16), rng=np.random.default_rng(0))
    head_before = model.head.aspp.project.conv.weight.data.copy()
    io.import_torchvision_densenet121(tmp_path / "densenet121.pth", model)   # a path, read with weights_only
    own = model.backbone.state_dict()
    for k, v in state.items():
        if k.startswith("classifier."):
            continue
        key = re.sub(r"(denselayer\d+\.(?:norm|relu|conv))\.([12])\.", r"\1\2.", k)
        np.testing.assert_array_equal(own[key], v.numpy().astype(own[key].dtype), err_msg=key)
    if legacy:
        assert int(own["features.norm5.num_batches_tracked"]) == 0
    np.testing.assert_array_equal(model.head.aspp.project.conv.weight.data, head_before)

    net = densenet121(rng=np.random.default_rng(1))   # a bare DenseNet and a state dict work too
    io.import_torchvision_densenet121({k: v.numpy() for k, v in state.items()}, net)
    np.testing.assert_array_equal(net.features.conv0.weight.data, model.backbone.features.conv0.weight.data)


def test_import_rejects_other_architectures():
    torch = pytest.importorskip("torch")
    state = _torchvision_like_state_dict(torch, legacy=False)
    state["features.denseblock4.denselayer17.conv1.weight"] = torch.zeros(128, 1024, 1, 1)
    with pytest.raises(ValueError, match=r"unexpected keys in the file \(features\.denseblock4\.denselayer17"):
        io.import_torchvision_densenet121(state, densenet121())
    state = _torchvision_like_state_dict(torch, legacy=False)
    del state["features.norm5.weight"]
    state["features.conv0.weight"] = torch.zeros(96, 3, 7, 7)
    with pytest.raises(ValueError, match=r"missing from the file \(features\.norm5\.weight\).*"
                                         r"features\.conv0\.weight: model \(64, 3, 7, 7\) vs file \(96, 3, 7, 7\)"):
        io.import_torchvision_densenet121(state, densenet121())


def test_exported_weights_load_into_pytorch_and_agree():
    torch = pytest.importorskip("torch")
    from minideeplab.torch_oracle import TorchDeepLabV3

    model = small(16, dtype=np.float64).eval()
    tmodel = TorchDeepLabV3(model.config).double().eval()
    tmodel.load_state_dict({k: torch.from_numpy(v) for k, v in io.export_state_dict(model).items()}, strict=True)
    x = np.random.default_rng(0).standard_normal((1, 3, 37, 41))
    with torch.no_grad():
        expected = tmodel(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(model(x), expected, rtol=1e-10, atol=1e-12)
