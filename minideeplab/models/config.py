"""One dataclass describes a DeepLabV3-DenseNet network; it travels inside checkpoints as JSON."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from .densenet import check_output_stride


def default_rates(output_stride: int) -> tuple:
    """DeepLabV3's atrous rates (6, 12, 18) at output stride 16, scaled by 16 / output_stride."""
    return tuple(r * 16 // output_stride for r in (6, 12, 18))


@dataclass
class DeepLabConfig:
    """Architecture of a DeepLabV3 with a DenseNet backbone. Defaults: DenseNet-121, output stride 16.

    Args:
        growth_rate, block_config, num_init_features, bn_size: the DenseNet (torchvision's meaning).
        output_stride: 8, 16 or 32.
        aspp_channels: width of every ASPP branch and of the projection.
        rates: the three atrous rates; None means (6, 12, 18) * 16 / output_stride.
        num_classes: output channels (1 for binary segmentation).
        dropout: drop probability after the ASPP projection.
        image_pooling: keep ASPP's image-pooling branch (False, and ``rates=()`` for no atrous branch: the
            ablations of the ``aspp`` experiment).
    """
    growth_rate: int = 32
    block_config: tuple = (6, 12, 24, 16)
    num_init_features: int = 64
    bn_size: int = 4
    output_stride: int = 16
    aspp_channels: int = 256
    rates: tuple | None = None
    num_classes: int = 1
    dropout: float = 0.1
    image_pooling: bool = True

    def __post_init__(self):
        check_output_stride(self.output_stride)
        self.block_config = tuple(int(b) for b in self.block_config)
        if self.rates is not None:
            self.rates = tuple(int(r) for r in self.rates)
        if not 0 <= self.dropout < 1:
            raise ValueError(f"DeepLabConfig: dropout must be in [0, 1), got {self.dropout}")

    @property
    def resolved_rates(self) -> tuple:
        """The atrous rates in use: ``rates``, or (6, 12, 18) scaled by 16 / output_stride."""
        return self.rates if self.rates is not None else default_rates(self.output_stride)

    @classmethod
    def small(cls, **overrides) -> DeepLabConfig:
        """A tiny network with the same structure (growth 8, blocks (2, 2, 2, 2), 16 initial features,
        bn_size 2, 16 ASPP channels), for tests, gradient checks and notebooks."""
        kw = {"growth_rate": 8, "block_config": (2, 2, 2, 2), "num_init_features": 16, "bn_size": 2,
              "aspp_channels": 16}
        kw.update(overrides)
        return cls(**kw)

    def to_dict(self) -> dict:
        """A JSON-able dict (tuples become lists). Fields added later (``image_pooling``) are written only when they
        differ from their default, so a default model's saved config is the same as before they existed (``io.load``
        compares saved and current configs key by key)."""
        d = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}
        if d["image_pooling"]:
            del d["image_pooling"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> DeepLabConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"DeepLabConfig.from_dict: unknown fields {unknown} (known: {sorted(known)})")
        return cls(**d)
