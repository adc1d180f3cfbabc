"""Update rules: GaLore, Fira, APOLLO — from low-rank direction to full-rank step."""

from lit_lowrank.rules.base import RuleInputs, UpdateRule

__all__ = ["RuleInputs", "UpdateRule"]
