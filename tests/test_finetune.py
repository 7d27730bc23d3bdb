"""Starting from ImageNet: torchvision's DenseNet-121 file in (every kind of wrong file refused clearly), frozen
batch norm, and separate backbone/head parameters for the fine-tuning recipe of docs/finetune.md."""
import re
import sys

import numpy as np
import pytest

from minideeplab import io
from minideeplab.finetune import backbone_and_head_parameters, freeze_batchnorm
from minideeplab.models import DeepLabConfig, build_deeplab, densenet121
from minideeplab.nn import BatchNorm2d
from minideeplab.optim import AdamW


def _torchvision_state(torch, seed=0):
    """Random weights under torchvision's densenet121 keys and shapes (torchvision is not needed: the keys and
    shapes of our own backbone, which ``test_models`` ties to torchvision's), plus its 1000-class classifier."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for k, v in densenet121().state_dict().items():
        if k.endswith("num_batches_tracked"):
            state[k] = torch.tensor(5)
        elif k.endswith("running_var"):
            state[k] = torch.rand(v.shape, generator=gen) + 0.5
        else:
            state[k] = torch.randn(v.shape, generator=gen)
    state["classifier.weight"] = torch.randn(1000, 1024, generator=gen)
    state["classifier.bias"] = torch.randn(1000, generator=gen)
    return state


def _assert_loaded(net, state):
    own = net.state_dict()
    for k, v in state.items():
        if not k.startswith("classifier."):
            np.testing.assert_array_equal(own[k], v.float().numpy().astype(own[k].dtype), err_msg=k)


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch")


@pytest.fixture(scope="module")
def tv_state(torch):
    return _torchvision_state(torch)


def test_nested_prefixed_and_features_only_state_dicts_load(tmp_path, torch, tv_state):
    """The shapes training scripts save weights in: nested under "state_dict" / "model" next to other entries,
    keys prefixed with "module." (DataParallel), or the features module's own state dict (no "features.")."""
    variants = {
        "nested.pth": {"epoch": 90, "state_dict": tv_state, "optimizer": {"lr": 0.1}},
        "model.pth": {"model": {k: v for k, v in tv_state.items()}, "arch": "densenet121"},
        "ddp.pth": {"module." + k: v for k, v in tv_state.items()},
        "features.pth": {k[len("features."):]: v for k, v in tv_state.items() if k.startswith("features.")},
    }
    for name, obj in variants.items():
        torch.save(obj, tmp_path / name)
        net = densenet121(rng=np.random.default_rng(1))
        io.import_torchvision_densenet121(tmp_path / name, net)
        _assert_loaded(net, tv_state)


def test_bfloat16_weights_load_as_float32(torch, tv_state):
    half = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in tv_state.items()}
    net = io.import_torchvision_densenet121(half, densenet121())
    assert net.features.conv0.weight.data.dtype == np.float32
    np.testing.assert_array_equal(net.features.conv0.weight.data, half["features.conv0.weight"].float().numpy())


def test_path_that_is_not_a_file(tmp_path, torch):
    with pytest.raises(ValueError, match=r"import_torchvision_densenet121: '.*missing\.pth' is not a file \(no such "
                                         r"file\).*densenet121-a639ec97\.pth"):
        io.import_torchvision_densenet121(tmp_path / "missing.pth", densenet121())
    with pytest.raises(ValueError, match=r"is a folder, not a file"):
        io.import_torchvision_densenet121(tmp_path, densenet121())


def test_files_that_are_not_torch_checkpoints(tmp_path, torch, tv_state):
    (tmp_path / "notes.pth").write_text("densenet121 weights: see the URL\n")
    (tmp_path / "empty.pth").write_bytes(b"")
    torch.save(tv_state, tmp_path / "good.pth")
    data = (tmp_path / "good.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    for name in ("notes.pth", "empty.pth", "cut.pth"):
        with pytest.raises(ValueError, match=rf"'.*{re.escape(name)}' is not a PyTorch checkpoint that torch.load "
                                             r"can read \(\w+") as err:
            io.import_torchvision_densenet121(tmp_path / name, densenet121())
        assert len(str(err.value)) < 400, str(err.value)     # torch's own messages run to a page
    np.savez(tmp_path / "run.npz", a=np.ones(3))
    with pytest.raises(ValueError, match=r"run\.npz' is a NumPy \.npz archive, not a PyTorch checkpoint.*load_model"):
        io.import_torchvision_densenet121(tmp_path / "run.npz", densenet121())
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(ValueError, match=r"list\.pth' holds a list, not a state dict"):
        io.import_torchvision_densenet121(tmp_path / "list.pth", densenet121())
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "meta.pth")
    with pytest.raises(ValueError, match=r"meta\.pth' is a dict of 2 entries \(epoch, lr\) but neither a state dict"):
        io.import_torchvision_densenet121(tmp_path / "meta.pth", densenet121())


def test_torch_missing_names_pip_install(tmp_path, monkeypatch, torch, tv_state):
    torch.save(tv_state, tmp_path / "densenet121.pth")
    monkeypatch.setitem(sys.modules, "torch", None)      # `import torch` raises ImportError now
    with pytest.raises(ImportError, match=r"needs PyTorch \(pip install torch\)"):
        io.import_torchvision_densenet121(tmp_path / "densenet121.pth", densenet121())
    monkeypatch.undo()
    net = io.import_torchvision_densenet121({k: v.numpy() for k, v in tv_state.items()}, densenet121())
    _assert_loaded(net, tv_state)      # a state dict of arrays needs no torch


def test_pickled_model_object_needs_allow_pickle(tmp_path, torch, tv_state):
    """A whole model saved with torch.save(model): weights_only loading refuses it, and so do we unless asked."""
    from minideeplab.torch_oracle import TorchDenseNet

    tmodel = TorchDenseNet(DeepLabConfig(output_stride=32))
    tmodel.load_state_dict({k: v for k, v in tv_state.items() if k.startswith("features.")})
    torch.save(tmodel, tmp_path / "whole_model.pth")
    with pytest.raises(ValueError, match=r"holds a pickled Python object \(minideeplab\.torch_oracle\.TorchDenseNet\)"
                                         r".*torch\.save\(model\.state_dict\(\), path\).*allow_pickle=True"):
        io.import_torchvision_densenet121(tmp_path / "whole_model.pth", densenet121())
    net = io.import_torchvision_densenet121(tmp_path / "whole_model.pth", densenet121(), allow_pickle=True)
    _assert_loaded(net, {k: v for k, v in tv_state.items() if k.startswith("features.")})


def test_other_architectures_get_a_short_message_with_counts(torch, tv_state):
    gen = torch.Generator().manual_seed(0)
    resnet = {"conv1.weight": torch.randn(64, 3, 7, 7, generator=gen), "bn1.weight": torch.ones(64),
              "layer1.0.conv1.weight": torch.randn(64, 64, 1, 1, generator=gen), "fc.weight": torch.zeros(1000, 2048)}
    with pytest.raises(ValueError, match=r"only 0 of the backbone's \d+ keys are in it, which has 4 keys; not "
                                         r"DenseNet-121 weights\? \(expected e\.g\. features\.conv0\.weight, .*it has "
                                         r"e\.g\. conv1\.weight, bn1\.weight, layer1\.0\.conv1\.weight\)") as err:
        io.import_torchvision_densenet121(resnet, densenet121())
    assert len(str(err.value)) < 400
    # DenseNet-169 has blocks (6, 12, 32, 32): extra layers and wider transitions
    wider = dict(tv_state)
    for i in range(17, 20):
        wider[f"features.denseblock4.denselayer{i}.conv1.weight"] = torch.zeros(128, 1024, 1, 1)
    wider["features.norm5.weight"] = torch.ones(1664)
    wider["features.norm5.bias"] = torch.zeros(1664)
    with pytest.raises(ValueError, match=r"does not fit the model's DenseNet backbone: 3 unexpected keys in the file "
                                         r"\(features\.denseblock4\.denselayer17\.conv1\.weight, .*\); 2 shape "
                                         r"mismatches \(features\.norm5\.weight: model \(1024,\) vs file \(1664,\), "
                                         r"features\.norm5\.bias") as err:
        io.import_torchvision_densenet121(wider, densenet121())
    assert str(err.value).count("features.") <= 6        # examples are capped at three per kind
    small = build_deeplab(DeepLabConfig.small(), rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"backbone \(block_config \(2, 2, 2, 2\), growth_rate 8\): 600 unexpected keys "
                                         r"in the file \(.* and 597 more\); 104 shape "
                                         r"mismatches \(features\.conv0\.weight: model \(16, 3, 7, 7\) vs file "
                                         r"\(64, 3, 7, 7\)"):
        io.import_torchvision_densenet121(tv_state, small)


# -- frozen batch norm ---------------------------------------------------------------------------------------
def _small_model(dtype=np.float64, seed=0):
    model = build_deeplab(DeepLabConfig.small(dropout=0.0), rng=np.random.default_rng(seed), dtype=dtype)
    rng = np.random.default_rng(seed + 1)
    for m in model.modules():      # running statistics away from (0, 1), as pretrained ones are
        if isinstance(m, BatchNorm2d):
            m.running_mean[...] = rng.normal(0, 0.2, m.num_features)
            m.running_var[...] = rng.uniform(0.5, 2.0, m.num_features)
    return model


def test_freeze_batchnorm_keeps_statistics_and_returns_the_rest():
    model = _small_model()
    norms = [m for m in model.modules() if isinstance(m, BatchNorm2d)]
    trainable = freeze_batchnorm(model)
    assert model.training and not any(m.training for m in norms)
    assert len(trainable) == len(list(model.parameters())) - 2 * len(norms)
    assert not {id(p) for m in norms for p in m.parameters()} & {id(p) for p in trainable}
    before = {k: v.copy() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    x = np.random.default_rng(2).standard_normal((2, 3, 32, 32))
    model(x)
    for k, v in before.items():
        np.testing.assert_array_equal(model.state_dict()[k], v, err_msg=k)
    assert freeze_batchnorm(model) == trainable           # idempotent
    model.train()
    assert all(m.training for m in norms)                 # train() unfreezes: the docstring says call it again
    with pytest.raises(TypeError, match="expected a minideeplab Module"):
        freeze_batchnorm(object())


def test_frozen_batchnorm_gradients_match_pytorch():
    """A model in training mode with every batch norm in eval mode: our hand-written backward (dense blocks and
    fused heads included) against PyTorch's autograd of the same configuration, in float64."""
    torch = pytest.importorskip("torch")
    from minideeplab.torch_oracle import to_torch

    model = _small_model()
    freeze_batchnorm(model)
    tmodel = to_torch(model)
    for m in tmodel.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 40, 40))
    dout = rng.standard_normal((2, 1, 40, 40))
    model.zero_grad()
    logits = model(x)
    model.backward(dout)
    tlogits = tmodel(torch.from_numpy(x))
    np.testing.assert_allclose(logits, tlogits.detach().numpy(), rtol=1e-10, atol=1e-12)
    (tlogits * torch.from_numpy(dout)).sum().backward()
    tgrads = dict(tmodel.named_parameters())
    for name, p in model.named_parameters():
        np.testing.assert_allclose(p.grad, tgrads[name].grad.numpy(), rtol=1e-8, atol=1e-10, err_msg=name)


def test_two_learning_rates_and_frozen_norms_in_one_step():
    """The recipe: frozen batch norm, AdamW at 1e-4 on the backbone and 1e-3 on the head. A first AdamW step moves
    every parameter with a nonzero gradient by lr * g / (|g| + eps), i.e. by its group's lr (weight decay 0)."""
    model = _small_model(np.float32)
    backbone, head = backbone_and_head_parameters(model, freeze_batchnorm(model))
    assert len(backbone) + len(head) == len(freeze_batchnorm(model))
    assert all("norm" not in n and ".bn." not in n for n, p in model.named_parameters()
               if any(p is q for q in backbone + head))
    optimizers = [AdamW(backbone, lr=1e-4, weight_decay=0.0), AdamW(head, lr=1e-3, weight_decay=0.0)]
    before = {n: p.data.copy() for n, p in model.named_parameters()}
    x = np.random.default_rng(4).standard_normal((2, 3, 32, 32)).astype(np.float32)
    model.zero_grad()
    model(x)
    model.backward(np.ones((2, 1, 32, 32), np.float32) / x.size)
    for opt in optimizers:
        opt.step()
    steps = {n: np.abs(p.data - before[n]).max() for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        if any(p is q for q in backbone):
            assert steps[n] == pytest.approx(1e-4, rel=1e-2), n
        elif any(p is q for q in head):
            assert steps[n] == pytest.approx(1e-3, rel=1e-2), n
        else:
            assert steps[n] == 0, n         # a frozen batch norm's weight or bias
    with pytest.raises(TypeError, match="expected a DeepLabV3"):
        backbone_and_head_parameters(model.backbone)
