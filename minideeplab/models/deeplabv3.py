"""DeepLabV3 (Chen et al., 2017): atrous backbone → ASPP → 1×1 classifier → bilinear upsample to the input."""
from __future__ import annotations

import numpy as np

from ..nn import Conv2d, Module, Upsample, no_grad, sigmoid
from ..nn.functional import check_input
from ..nn.threads import inference_threads, split_forward
from .aspp import ASPP
from .config import DeepLabConfig, default_rates
from .densenet import DenseNet, _Named, check_input_size, check_output_stride, min_input_size


class DeepLabV3(Module):
    """Segmentation network: ``backbone`` → ``head`` (``aspp`` → ``classifier``) → ``upsample``.

    Works for any input size: the logits are resized with bilinear interpolation (align_corners=False) to
    exactly (H, W), also when H, W are not multiples of the output stride.

    Inputs smaller than ``min_input_size`` (5, 13, 29 pixels at output stride 8, 16, 32: see
    ``densenet.min_input_size``) are refused with a ValueError naming that minimum, before any layer runs.

    Batch size 1 in training mode raises a ValueError naming the image-pooling branch
    (``head.aspp.pooling``): its batch norm would see one value per channel. Train with batches of at
    least 2 images; a single image runs fine in eval mode.

    Shapes:
        x: (N, 3, H, W) -> logits: (N, num_classes, H, W).

    Args:
        backbone: a ``DenseNet`` (any output stride); its ``out_channels`` feed the ASPP.
        num_classes: logit channels (1 for binary segmentation: apply a sigmoid).
        output_stride: must equal the backbone's; sets the default rates.
        rates: atrous rates; None means (6, 12, 18) * 16 / output_stride, i.e. (12, 24, 36) at 8.
        aspp_channels: ASPP width. dropout: after the ASPP projection.
        rng, dtype: initialisation Generator and parameter dtype.
        image_pooling: keep ASPP's image-pooling branch.

    Textbook twin: ``minideeplab.textbook.DeepLabV3`` (``textbook.deeplabv3_densenet121``, ``textbook.build_deeplab``):
    the same modules, state-dict keys and, from the same Generator, initial weights, built from the plain layers;
    tests/test_textbook_model.py holds the two to float64 rounding at every output stride in both modes. Everything
    that makes this one faster is in its layers (their docstrings; docs/fast_paths.md): the OS 16 training step on
    2x3x256x256, one thread, takes 1.14 s of CPU time against the textbook's 2.37, with 694 MiB peak memory against
    1301 (``minideeplab bench --textbook``, benchmarks/README.md).

    ``set_output_stride(os)`` switches a built (or trained) model to another output stride with the same weights
    (``models.set_output_stride``): DeepLabV3's "train at 16, evaluate at 8".
    """

    def __init__(self, backbone: DenseNet, num_classes: int = 1, output_stride: int = 16, rates=None,
                 aspp_channels: int = 256, dropout: float = 0.1, rng: np.random.Generator | None = None,
                 dtype=np.float32, image_pooling: bool = True):
        super().__init__()
        check_output_stride(output_stride)
        if getattr(backbone, "output_stride", output_stride) != output_stride:
            raise ValueError(f"DeepLabV3: output_stride={output_stride} but the backbone was built with "
                             f"output_stride={backbone.output_stride}")
        rng = rng if rng is not None else np.random.default_rng()
        rates = tuple(rates) if rates is not None else default_rates(output_stride)
        self.output_stride, self.rates, self.num_classes = output_stride, rates, int(num_classes)
        self.backbone = backbone
        self.head = _Named(aspp=ASPP(backbone.out_channels, aspp_channels, rates, dropout, rng=rng, dtype=dtype,
                                     image_pooling=image_pooling),
                           classifier=Conv2d(aspp_channels, num_classes, 1, bias=True, rng=rng, dtype=dtype))
        self.upsample = Upsample(size=(1, 1), mode="bilinear", align_corners=False)
        self.config = None   # set by build_deeplab
        self.min_input_size = getattr(backbone, "min_input_size", None) or min_input_size(backbone)

    def forward(self, x):
        check_input("DeepLabV3", x, 3)
        check_input_size("DeepLabV3", x, self.min_input_size, self.output_stride)
        parts = inference_threads(self, x)
        if parts > 1:     # inference (no_grad, eval) on the CPU: the batch split over the BLAS's threads (nn.threads)
            return split_forward(self, x, parts)
        logits = self.head(self.backbone(x))
        self.upsample.size = tuple(x.shape[2:])   # back to the input size, whatever the rounding was
        self._forward_done()
        return self.upsample(logits)

    def backward(self, dlogits, input_grad: bool = True):
        """dL/d(image) from dL/d(logits), with every parameter gradient accumulated on the way.

        ``input_grad=False`` (a training step, where nothing reads the image's gradient) skips the stem conv's
        input gradient, its largest col2im, and returns None.

        One backward per forward: a second one raises a RuntimeError (it would add the gradients again)."""
        self._backward_start()
        self.backbone.features.conv0.input_grad = input_grad
        return self.backbone.backward(self.head.backward(self.upsample.backward(dlogits)))

    def predict_proba(self, x):
        """Sigmoid of the logits (N, num_classes, H, W), in the current mode (call ``eval()`` first)."""
        with no_grad():     # inference: nothing kept for a backward (and, on the CPU, the batch split over threads)
            return sigmoid(self(x))

    def predict(self, x, threshold: float = 0.5):
        """Boolean mask ``predict_proba(x) > threshold``, in the current mode (call ``eval()`` first)."""
        return self.predict_proba(x) > threshold

    def set_output_stride(self, output_stride: int) -> DeepLabV3:
        """Switch to ``output_stride`` (8, 16 or 32) keeping the weights; see ``models.set_output_stride``."""
        from .stride import set_output_stride
        return set_output_stride(self, output_stride)

    def extra_repr(self):
        return f"num_classes={self.num_classes}, output_stride={self.output_stride}, rates={self.rates}"


def build_deeplab(config: DeepLabConfig | None = None, rng: np.random.Generator | None = None,
                  dtype=np.float32) -> DeepLabV3:
    """Build the network ``config`` describes (default: DeepLabV3-DenseNet121, output stride 16)."""
    config = config if config is not None else DeepLabConfig()
    rng = rng if rng is not None else np.random.default_rng()
    backbone = DenseNet(config.growth_rate, config.block_config, config.num_init_features, config.bn_size,
                        output_stride=config.output_stride, rng=rng, dtype=dtype)
    model = DeepLabV3(backbone, config.num_classes, config.output_stride, config.resolved_rates,
                      config.aspp_channels, config.dropout, rng=rng, dtype=dtype,
                      image_pooling=config.image_pooling)
    model.config = config
    return model


def deeplabv3_densenet121(num_classes: int = 1, output_stride: int = 16, rates=None,
                          rng: np.random.Generator | None = None, dtype=np.float32) -> DeepLabV3:
    """DeepLabV3 on DenseNet-121 (ImageNet weights load with ``io.import_torchvision_densenet121``)."""
    config = DeepLabConfig(num_classes=num_classes, output_stride=output_stride, rates=rates)
    return build_deeplab(config, rng=rng, dtype=dtype)
