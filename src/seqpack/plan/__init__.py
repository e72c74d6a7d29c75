"""``seqpack plan``: per-rank peak memory and step FLOPs of a training configuration, before renting GPUs.

    >>> from seqpack.plan import load_shape, PlanOptions, plan_memory, longest_fit   # doctest: +SKIP
    >>> shape, _ = load_shape("path/to/hf_folder")                                   # doctest: +SKIP
    >>> plan_memory(shape, PlanOptions(seq_len=65536, gpus=8, sp=8)).reserved / 2**30  # doctest: +SKIP
"""

from .memory import (PRECISIONS, Plan, PlanOptions, layer_saved_bytes, longest_fit, parse_memory, plan_memory,
                     sp_candidates)
from .shape import ModelShape, load_shape, shape_from_config_json, shape_from_hf_config

__all__ = ["PRECISIONS", "ModelShape", "Plan", "PlanOptions", "layer_saved_bytes", "load_shape", "longest_fit",
           "parse_memory", "plan_memory", "shape_from_config_json", "shape_from_hf_config", "sp_candidates"]
