"""Shared fixtures: ``xp`` runs a test on NumPy, and on CuPy where it imports and a GPU is visible."""
import numpy as np
import pytest

from minideeplab.backend import cuda_available

BACKENDS = ["numpy"] + (["cupy"] if cuda_available() else [])


@pytest.fixture(params=BACKENDS)
def xp(request):
    if request.param == "cupy":
        import cupy
        return cupy
    return np


@pytest.fixture
def device(xp):
    """'cpu' or 'cuda', matching ``xp``."""
    return "cpu" if xp is np else "cuda"


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
