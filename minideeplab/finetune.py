"""Fine-tuning helpers: frozen batch norm, and the backbone's and the head's parameters apart.

Fine-tuning from ImageNet weights (``io.import_torchvision_densenet121``) at a small batch size usually freezes the
batch norms: their running statistics, estimated on ImageNet over large batches, are better than the statistics of
a batch of 2-8 images, and their scale and shift stay as pretrained. ``freeze_batchnorm`` does that for a
minideeplab model: every ``BatchNorm2d`` runs in eval mode inside a model in training mode (its forward uses the
running statistics, its backward is the eval-mode one, ``dL/dx = gamma / sqrt(running_var + eps) * dout``), and
it returns the parameters that stay trainable, for the optimizer. The recipe is in ``docs/finetune.md``.
"""
from __future__ import annotations

from .nn import BatchNorm2d
from .nn.module import Module, Parameter


def freeze_batchnorm(model: Module) -> list[Parameter]:
    """Put every ``BatchNorm2d`` of ``model`` in eval mode and return the parameters that stay trainable.

    In eval mode a batch norm normalises with ``running_mean``/``running_var`` and no longer updates them. Its
    ``weight`` and ``bias`` still receive gradients in backward, so the returned list, every parameter but the
    batch norms' (in ``model.parameters()`` order), is what to give the optimizer: the frozen ones then never
    change (weight decay included). ``model.train()`` puts every layer back in training mode: call this again
    after it (it is idempotent and only sets flags).

    Shapes: no arrays change; the model's forward and backward keep their shapes.

    Args:
        model: any minideeplab ``Module`` (a ``DeepLabV3``, its ``backbone``, a ``DenseBlock``, ...).

    Returns:
        the trainable parameters, e.g. ``AdamW(freeze_batchnorm(model), lr=1e-4)``.
    """
    if not isinstance(model, Module):
        raise TypeError(f"freeze_batchnorm: expected a minideeplab Module, got {type(model).__name__}")
    frozen = set()
    for m in model.modules():
        if isinstance(m, BatchNorm2d):
            m.eval()
            frozen.update(id(p) for p in m.parameters())
    return [p for p in model.parameters() if id(p) not in frozen]


def backbone_and_head_parameters(model: Module, trainable=None) -> tuple[list[Parameter], list[Parameter]]:
    """``(backbone parameters, head parameters)`` of a ``DeepLabV3``, for one optimizer each (each with its own
    learning rate, e.g. 10x lower for the pretrained backbone). ``trainable``: keep only these parameters (the list
    ``freeze_batchnorm`` returned).

    Shapes: none (lists of ``Parameter``).
    """
    if not hasattr(model, "backbone") or not hasattr(model, "head"):
        raise TypeError(f"backbone_and_head_parameters: expected a DeepLabV3 (with .backbone and .head), got "
                        f"{type(model).__name__}")
    keep = None if trainable is None else {id(p) for p in trainable}
    backbone = [p for p in model.backbone.parameters() if keep is None or id(p) in keep]
    head = [p for p in model.head.parameters() if keep is None or id(p) in keep]
    return backbone, head


__all__ = ["backbone_and_head_parameters", "freeze_batchnorm"]
