import numpy as np

from minideeplab import nn


def test_conv_forward_shape(xp, device, rng):
    conv = nn.Conv2d(3, 5, 3, stride=2, padding=1, rng=rng).to(device)
    x = xp.asarray(rng.standard_normal((2, 3, 9, 7)).astype(np.float32))
    assert conv(x).shape == (2, 5, 5, 4)
