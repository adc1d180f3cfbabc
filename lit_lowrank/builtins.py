"""The in-tree plugins. Each module registers its components through the same hooks that
third-party packages implement; the plugin manager imports these by name."""

BUILTIN_MODULES = (
    "lit_lowrank.projectors.svd",
    "lit_lowrank.schedules.fixed",
    "lit_lowrank.inner.adamw",
    "lit_lowrank.inner.adamw_hf",
    "lit_lowrank.inner.adamw8bit",
    "lit_lowrank.inner.adafactor",
    "lit_lowrank.inner.lion",
    "lit_lowrank.inner.sgd",
    "lit_lowrank.inner.momentum",
    "lit_lowrank.inner.adamw_sn",
    "lit_lowrank.rules.galore",
    "lit_lowrank.quantizers.int",
    "lit_lowrank.quantizers.bnb",
    "lit_lowrank.schedules.lazy",
    "lit_lowrank.rules.fira",
    "lit_lowrank.rules.apollo",
    "lit_lowrank.rules.snsm",
    "lit_lowrank.projectors.random",
    "lit_lowrank.projectors.rsvd",
    "lit_lowrank.projectors.online_pca",
    "lit_lowrank.projectors.dct",
    "lit_lowrank.projectors.adaptive_rank",
    "lit_lowrank.projectors.tucker",
    "lit_lowrank.methods",
)
