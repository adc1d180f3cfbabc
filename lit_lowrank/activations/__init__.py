"""Transforms that cut activation memory: CompAct's compressed linear activations."""

from lit_lowrank.activations.compact import CompactLinear, bind_compact, check_compact_options, compact_linear_layers

__all__ = ["CompactLinear", "bind_compact", "check_compact_options", "compact_linear_layers"]
