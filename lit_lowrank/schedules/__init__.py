"""Schedules: when a parameter's subspace is refreshed."""

from lit_lowrank.schedules.base import Schedule

__all__ = ["Schedule"]
