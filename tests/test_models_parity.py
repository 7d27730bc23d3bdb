"""PyTorch parity of the full DeepLabV3-DenseNet121 (skipped without torch; CI installs it).

The oracle (``minideeplab.torch_oracle``) is plain PyTorch with autograd: torchvision's DenseNet forward
(``torch.cat`` before every layer) plus the same head. Both run in training mode (batch statistics) with the
ASPP dropout set to 0: two libraries cannot draw the same dropout masks (dropout is checked on its own in the
engine's tests).

Errors are ``max |ours - torch| / max |torch|`` per tensor. Float64 must agree to 1e-8. In float32 the logits
must agree to 1e-4 of the output scale; the *gradients* of this 121-layer BN network at random init are too
ill-conditioned for an elementwise float32 bar (PyTorch's own float32 gradients differ from its float64 ones by
~1e-2 per tensor, mostly single ReLU masks flipping), so there ours must be about as close to the float64
reference as PyTorch's float32 is: relative L2 error over all gradients at most 2x PyTorch's.
"""
import numpy as np
import pytest

from minideeplab.models import deeplabv3_densenet121

torch = pytest.importorskip("torch")
from minideeplab.torch_oracle import to_torch  # noqa: E402 (needs torch, checked just above)


def _ours(model, x, g):
    model.zero_grad()
    y = model(x)
    dx = model.backward(g)
    return y, dx, {k: p.grad for k, p in model.named_parameters()}


def _torch(tmodel, x, g):
    xt = torch.from_numpy(x.copy()).requires_grad_(True)
    y = tmodel(xt)
    y.backward(torch.from_numpy(g))
    return y.detach().numpy(), xt.grad.numpy(), {k: p.grad.numpy() for k, p in tmodel.named_parameters()}


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def _l2(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.slow
@pytest.mark.parametrize("os_", [16, 8])
def test_full_model_parity_float64_and_float32(os_):
    rng = np.random.default_rng(os_)
    model = deeplabv3_densenet121(output_stride=os_, rng=np.random.default_rng(0), dtype=np.float64)
    model.head.aspp.project.dropout.p = 0.0
    m32 = deeplabv3_densenet121(output_stride=os_, rng=np.random.default_rng(1), dtype=np.float32)
    m32.load_state_dict(model.state_dict())
    m32.head.aspp.project.dropout.p = 0.0
    t64, t32 = to_torch(model), to_torch(m32)
    assert list(t64.state_dict()) == list(model.state_dict())

    x = rng.standard_normal((2, 3, 96, 96))
    g = rng.standard_normal((2, 1, 96, 96))

    # float64: logits, input gradient, every parameter gradient and the updated running statistics
    y, dx, grads = _ours(model, x, g)
    ty, tdx, tgrads = _torch(t64, x, g)
    assert y.shape == ty.shape == (2, 1, 96, 96)
    errors = {"logits": _rel(y, ty), "input grad": _rel(dx, tdx)}
    errors.update({k: _rel(grads[k], tgrads[k]) for k in tgrads})
    tstate = t64.state_dict()
    errors.update({k: _rel(v, tstate[k].numpy()) for k, v in model.state_dict().items() if "running" in k})
    assert len(errors) == 2 + len(grads) + 2 * sum("running_mean" in k for k in tstate)
    worst = max(errors, key=errors.get)
    assert errors[worst] <= 1e-8, f"float64 parity: worst {worst} {errors[worst]:.2e}"

    # float32 against PyTorch float32, both measured against the float64 reference
    x32, g32 = x.astype(np.float32), g.astype(np.float32)
    y32, dx32, grads32 = _ours(m32, x32, g32)
    ty32, tdx32, tgrads32 = _torch(t32, x32, g32)
    assert y32.dtype == np.float32
    assert _rel(y32, ty32) <= 1e-4 and _rel(y32, ty) <= 1e-4

    def flat(d, dxx):
        return np.concatenate([np.asarray(dxx, np.float64).ravel()] +
                              [np.asarray(d[k], np.float64).ravel() for k in sorted(tgrads)])

    ref = flat(tgrads, tdx)
    ours_err, torch_err = _l2(flat(grads32, dx32), ref), _l2(flat(tgrads32, tdx32), ref)
    assert ours_err <= 2 * torch_err + 1e-4, f"float32 gradients: ours {ours_err:.2e} vs torch {torch_err:.2e}"
