"""Analysis for teaching: receptive fields (analytic, exact region, empirical), valid atrous weights,
output stride vs cost, gradient flow (``flow``: each layer's activations and gradients during a step), and the
figures of the docs (``python -m minideeplab.analysis.figures``)."""
from .flow import LayerRecord, format_records, plot_activation_histograms, plot_gradient_flow, record_step
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
    "LayerRecord",
    "Node",
    "OSRow",
    "OSTable",
    "RFRegion",
    "RFRow",
    "RFTable",
    "count_macs",
    "count_params",
    "empirical_receptive_field",
    "format_records",
    "output_stride_table",
    "plot_activation_histograms",
    "plot_gradient_flow",
    "receptive_field",
    "receptive_field_region",
    "record_step",
    "trace",
    "valid_taps_per_axis",
    "valid_weight_curves",
    "valid_weight_histogram",
]
