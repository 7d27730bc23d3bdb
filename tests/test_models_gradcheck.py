"""Whole-network gradient checks (float64, central differences) through the one checker, ``check_module``.

Step size: eps=1e-6, not the default 1e-5. Worst relative error over all tensors in ``test_whole_model_gradients``
(its seeds), for eps 1e-4 / 1e-5 / 1e-6: OS 8: 5e-1 / 2e-2 / 3e-7; OS 16: 5e-2 / 2e-7 / 8e-7; OS 32: 4e-3 / 1e-5 /
1e-7. Two causes. At OS 32 the 33x33 input leaves 1x1 maps, where BN over a batch of 2 makes the loss strongly
curved: the error falls like eps² (truncation). At OS 8 the worst tensor, conv0.weight, sits within a few 1e-6 of a
kink (a ReLU or max-pool switching): its error is 5e-3 at eps 5e-6 and drops to noise at 2e-6, once the step no
longer crosses it. eps=1e-6 clears both while roundoff (~1e-16 * |L| / eps) stays below rtol.
"""
import numpy as np
import pytest

from minideeplab.gradcheck import check_module
from minideeplab.models import ASPP, DeepLabConfig, DenseBlock, build_deeplab
from minideeplab.nn import BatchNorm2d


@pytest.mark.parametrize("os_", [8, 16, 32])
def test_whole_model_gradients(os_):
    model = build_deeplab(DeepLabConfig.small(output_stride=os_), rng=np.random.default_rng(os_), dtype=np.float64)
    x = np.random.default_rng(100 + os_).standard_normal((2, 3, 33, 33))
    result = check_module(model, x, rtol=1e-6, eps=1e-6, full_limit=4, samples=3, rng=np.random.default_rng(7))
    names = {row.name for row in result.rows}
    # every parameter tensor was sampled, including the dense blocks and the image-pooling branch
    assert names == {"input"} | {n for n, _ in model.named_parameters()}
    assert "head.aspp.pooling.conv.weight" in names and "backbone.features.denseblock4.denselayer2.conv2.weight" in names
    assert all(row.checked >= min(3, int(np.prod(row.shape))) for row in result.rows)


@pytest.mark.parametrize("dilation", [1, 2])
def test_dense_block_gradients_every_entry(dilation):
    # all entries of the input and of every parameter: the gradient buffer's split and sum, entry by entry
    rng = np.random.default_rng(dilation)
    block = DenseBlock(3, 4, 2, 3, dilation=dilation, rng=rng, dtype=np.float64)
    x = rng.standard_normal((2, 4, 5, 6))
    check_module(block, x, rtol=1e-6, full_limit=10_000, rng=np.random.default_rng(1))


def test_aspp_gradients_train_and_eval():
    rng = np.random.default_rng(5)
    aspp = ASPP(6, 4, rates=(1, 2, 3), dropout=0.3, rng=rng, dtype=np.float64)
    x = rng.standard_normal((2, 6, 5, 7))
    check_module(aspp, x, rtol=1e-6, full_limit=200, rng=np.random.default_rng(2))
    aspp.eval()
    check_module(aspp, x, rtol=1e-6, full_limit=200, rng=np.random.default_rng(3))


def test_whole_model_gradients_eval_mode():
    model = build_deeplab(DeepLabConfig.small(output_stride=16), rng=np.random.default_rng(1), dtype=np.float64)
    # trained-looking running statistics: with the initial (0, 1) an exact 0 (a ReLU'd pixel) would stay exactly 0
    # through the next BN and sit on the following ReLU's kink, where central differences are meaningless
    rng = np.random.default_rng(4)
    for m in model.modules():
        if isinstance(m, BatchNorm2d):
            m.running_mean[...] = rng.normal(0, 0.2, m.num_features)
            m.running_var[...] = rng.uniform(0.5, 1.5, m.num_features)
    model.eval()
    x = np.random.default_rng(2).standard_normal((1, 3, 40, 36))   # batch 1 is fine in eval mode
    check_module(model, x, rtol=1e-6, eps=1e-6, full_limit=4, samples=3, rng=np.random.default_rng(9))
