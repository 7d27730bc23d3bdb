"""Analysis for teaching: receptive fields (analytic, exact region, empirical), valid atrous weights,
output stride vs cost, and the figures of the docs (``python -m minideeplab.analysis.figures``)."""
from .graph import Graph, Node, trace
from .output_stride import OSRow, OSTable, count_macs, count_params, output_stride_table
from .receptive_field import (
    EmpiricalRF,
    RFRegion,
    RFRow,
    RFTable,
    empirical_receptive_field,
    receptive_field,
    receptive_field_region,
)
from .valid_weights import valid_taps_per_axis, valid_weight_curves, valid_weight_histogram

__all__ = [
    "EmpiricalRF",
    "Graph",
    "Node",
    "OSRow",
    "OSTable",
    "RFRegion",
    "RFRow",
    "RFTable",
    "count_macs",
    "count_params",
    "empirical_receptive_field",
    "output_stride_table",
    "receptive_field",
    "receptive_field_region",
    "trace",
    "valid_taps_per_axis",
    "valid_weight_curves",
    "valid_weight_histogram",
]
