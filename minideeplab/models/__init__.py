"""Networks: the atrous DenseNet backbone, ASPP, DeepLabV3, their config and a summary table."""
from .aspp import ASPP, ASPPPooling
from .config import DeepLabConfig
from .deeplabv3 import DeepLabV3, build_deeplab, deeplabv3_densenet121
from .densenet import DenseBlock, DenseLayer, DenseNet, Transition, densenet121, set_fused
from .stride import set_output_stride
from .summary import summary, summary_rows

__all__ = ["ASPP", "ASPPPooling", "DeepLabConfig", "DeepLabV3", "DenseBlock", "DenseLayer", "DenseNet", "Transition",
           "build_deeplab", "deeplabv3_densenet121", "densenet121", "set_fused", "set_output_stride",
           "summary", "summary_rows"]
