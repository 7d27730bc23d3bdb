"""`make demo` (placeholder until training lands): forward/backward of a small conv net and its gradient check."""
from __future__ import annotations

import numpy as np

from . import nn
from .gradcheck import check_module


def small_net(rng: np.random.Generator) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False, rng=rng), nn.BatchNorm2d(8), nn.ReLU(),
        nn.MaxPool2d(3, stride=2, padding=1),
        nn.Conv2d(8, 8, 3, padding=2, dilation=2, rng=rng), nn.ReLU(),
        nn.Upsample(size=(16, 16)), nn.Conv2d(8, 1, 1, rng=rng),
    )


def main() -> None:
    rng = np.random.default_rng(0)
    net = small_net(rng).double()
    x = rng.standard_normal((2, 3, 16, 16))
    out = net(x)
    print(f"forward: {tuple(x.shape)} -> {tuple(out.shape)}")
    print(net)
    result = check_module(net, x, rng=rng)
    print("\ngradient check (float64, central differences):")
    print(result.table())
    print(f"\nworst relative error: {result.worst:.2e}")


if __name__ == "__main__":
    main()
