"""What LowRankCallback and the lowrank strategies turn a user's optimizer into: SGD stays SGD
(equal to the plain run at full rank), Adam keeps its coupled L2, unsupported optimizers are
refused naming the opt-in ``inner=``; every LowRankConfig field is honoured or refused;
``Tuner.lr_find`` sweeps the optimizer that will train."""

from __future__ import annotations

import logging

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.demos.boring_classes import BoringModel, RandomDataset
from lightning.pytorch.demos.transformer import LightningTransformer
from lightning.pytorch.tuner import Tuner
from torch.utils.data import DataLoader

from lit_lowrank import LowRankOptimizer, select_targets
from lit_lowrank.lightning import LayerwiseCallback, LowRankCallback, LowRankConfig, LowRankStrategy
from lit_lowrank.transforms.int_weights import QuantizedLinear

QUIET = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
             accelerator="cpu", num_sanity_val_steps=0, limit_val_batches=0)


class Boring(BoringModel):
    """BoringModel with the optimizer under test (a fresh one per fit)."""

    def __init__(self, make_optimizer=lambda params: torch.optim.SGD(params, lr=0.1)) -> None:
        super().__init__()
        self.make_optimizer = make_optimizer
        self.stepping: list[type] = []

    def training_step(self, batch, batch_idx):
        self.stepping.append(type(self.trainer.optimizers[0]))
        return super().training_step(batch, batch_idx)

    def configure_optimizers(self):
        return self.make_optimizer(self.parameters())


def fit(model, steps=4, **trainer_options):
    trainer = pl.Trainer(max_steps=steps, **QUIET, **trainer_options)
    trainer.fit(model, DataLoader(RandomDataset(32, 64), batch_size=8))
    return trainer


def sgd_momentum(params):
    return torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)


@pytest.mark.slow
@pytest.mark.parametrize("adoption", ["callback", "strategy"])
def test_converted_sgd_at_full_rank_equals_the_plain_lightning_run(adoption):
    """BoringModel's 2×32 layer at rank 2 (full) with a basis fitted once: SGD with momentum in
    low-rank space is SGD on the full weight, so the converted run equals the unconverted one."""
    options = dict(targets=["layer"], rank=2, scale=1.0, update_gap=1000)
    torch.manual_seed(0)
    plain = Boring(sgd_momentum)
    torch.manual_seed(0)
    converted = Boring(sgd_momentum)
    torch.manual_seed(1)
    fit(plain)
    torch.manual_seed(1)
    trainer = fit(converted, **({"callbacks": [LowRankCallback(**options)]} if adoption == "callback"
                                else {"strategy": LowRankStrategy(**options)}))
    optimizer = trainer.optimizers[0]
    assert isinstance(optimizer, LowRankOptimizer)
    assert {g["inner"] for g in optimizer.param_groups} == {"sgd"}
    assert optimizer.defaults["inner_args"] == {"momentum": 0.9, "dampening": 0, "nesterov": True}
    for mine, want in zip(converted.parameters(), plain.parameters()):
        torch.testing.assert_close(mine, want, rtol=0, atol=1e-6)


class TinyTransformer(LightningTransformer):
    def prepare_data(self) -> None:  # no WikiText2 download
        pass


@pytest.mark.slow
def test_lightning_transformer_sgd_stays_sgd_and_the_loss_falls(caplog):
    torch.manual_seed(0)
    model = TinyTransformer(vocab_size=32)
    tokens = torch.randint(0, 32, (4, 12))
    data = DataLoader(list(zip(tokens, tokens.roll(-1, dims=1))), batch_size=4)  # one fixed batch
    losses = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(outputs["loss"].item())

    caplog.set_level(logging.INFO)
    trainer = pl.Trainer(max_steps=8, **QUIET, callbacks=[Record(), LowRankCallback(targets=["attn", "linear"],
                                                                                   rank=8, update_gap=4)])
    trainer.fit(model, data)
    assert {g["inner"] for g in trainer.optimizers[0].param_groups} == {"sgd"}
    assert losses[-1] < losses[0]  # at SGD's lr 0.1 an AdamW substitute diverges
    (line,) = [r.getMessage() for r in caplog.records if "converted" in r.getMessage()]
    assert "converted SGD(lr=0.1) → LowRankOptimizer(inner=sgd, rule=galore, projector=svd, rank=8)" in line
    projected, dense = select_targets(model, ["attn", "linear"])
    assert f"{len(projected)} weights projected, {len(dense)} dense" in line


@pytest.mark.slow
def test_adam_keeps_its_coupled_weight_decay_and_adamw_its_decoupled():
    callbacks = lambda: [LowRankCallback(targets=["layer"], rank=1)]
    adam = fit(Boring(lambda p: torch.optim.Adam(p, lr=1e-3, weight_decay=0.1)), callbacks=callbacks())
    adamw = fit(Boring(lambda p: torch.optim.AdamW(p, lr=1e-3, betas=(0.8, 0.9))), callbacks=callbacks())
    assert {g["decoupled_weight_decay"] for g in adam.optimizers[0].param_groups} == {False}
    assert {(g["decoupled_weight_decay"], g["betas"], g["weight_decay"])
            for g in adamw.optimizers[0].param_groups} == {(True, (0.8, 0.9), 0.01)}


@pytest.mark.slow
@pytest.mark.parametrize("make, named", [
    (lambda p: torch.optim.Adam(p, lr=1e-3, amsgrad=True), "Adam.*amsgrad"),
    (lambda p: torch.optim.RMSprop(p, lr=1e-3), "RMSprop has no low-rank equivalent"),
    (lambda p: torch.optim.SGD([{"params": list(p), "tag": 1}], lr=0.1), r"SGD.*keys \['tag'\]"),
])
def test_unsupported_optimizers_are_refused_naming_the_opt_in(make, named):
    with pytest.raises(ValueError, match=f"(?s){named}.*inner="):
        fit(Boring(make), callbacks=[LowRankCallback(targets=["layer"], rank=1)])


@pytest.mark.slow
def test_cycled_momentum_is_refused():
    class Cycled(Boring):
        def configure_optimizers(self):
            optimizer = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
            return [optimizer], [torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=10)]

    with pytest.raises(ValueError, match="cycle_momentum"):
        fit(Cycled(), strategy=LowRankStrategy(targets=["layer"], rank=1))


@pytest.mark.slow
def test_explicit_inner_accepts_a_substitute_and_says_what_is_not_reproduced():
    with pytest.warns(UserWarning, match=r"RMSprop.* replaced by inner='adamw'.*'alpha'.* not reproduced"):
        trainer = fit(Boring(lambda p: torch.optim.RMSprop(p, lr=1e-3, alpha=0.9)),
                      callbacks=[LowRankCallback(targets=["layer"], rank=1, inner="adamw")])
    groups = trainer.optimizers[0].param_groups
    assert {(g["inner"], g["lr"]) for g in groups} == {("adamw", 1e-3)}


@pytest.mark.slow
def test_a_methods_inner_replaces_sgd_keeping_its_coupled_weight_decay_and_naming_its_momentum():
    with pytest.warns(UserWarning, match=r"method 'galore-adafactor'.*'momentum'.* not reproduced"):
        trainer = fit(Boring(sgd_momentum), callbacks=[LowRankCallback(targets=["layer"], rank=1,
                                                                       method="galore-adafactor")])
    groups = trainer.optimizers[0].param_groups
    assert {(g["inner"], g["weight_decay"], g["decoupled_weight_decay"]) for g in groups} == {("adafactor", 0.01, False)}


@pytest.mark.slow
@pytest.mark.parametrize("adoption", ["callback", "strategy"])
def test_enabled_false_keeps_the_users_optimizer(adoption):
    model = Boring()
    options = dict(enabled=False, targets=["layer"])
    trainer = fit(model, **({"callbacks": [LowRankCallback(**options)]} if adoption == "callback"
                            else {"strategy": LowRankStrategy(**options)}))
    assert type(trainer.optimizers[0]) is torch.optim.SGD
    assert set(model.stepping) == {torch.optim.SGD}


@pytest.mark.slow
@pytest.mark.parametrize("adoption", ["callback", "strategy"])
def test_layerwise_adds_the_layerwise_callback(adoption):
    options = dict(targets=["layer"], rank=1, layerwise=True)
    trainer = fit(Boring(), **({"callbacks": [LowRankCallback(**options)]} if adoption == "callback"
                               else {"strategy": LowRankStrategy(**options)}))
    assert sum(isinstance(c, LayerwiseCallback) for c in trainer.callbacks) == 1
    with pytest.raises(ValueError, match="gradient_clip_val"):
        fit(Boring(), gradient_clip_val=1.0, **({"callbacks": [LowRankCallback(**options)]} if adoption == "callback"
                                                else {"strategy": LowRankStrategy(**options)}))


@pytest.mark.slow
@pytest.mark.parametrize("adoption", ["callback", "strategy"])
def test_weight_bits_quantizes_the_target_layers(adoption):
    options = dict(targets=["layer"], rank=1, weight_bits=8, weight_args={"group_size": 64})
    model = Boring()
    fit(model, steps=3, **({"callbacks": [LowRankCallback(**options)]} if adoption == "callback"
                           else {"strategy": LowRankStrategy(**options)}))
    assert isinstance(model.layer, QuantizedLinear) and model.layer.updates == 3


@pytest.mark.parametrize("field, value", [("lr", 0.1), ("weight_decay", 0.1), ("betas", (0.8, 0.9)), ("eps", 1e-6),
                                          ("warmup", 5), ("min_lr_ratio", 0.0), ("lr_schedule", "linear")])
def test_fields_the_module_owns_are_refused(field, value):
    for make in (lambda: LowRankCallback(**{field: value}), lambda: LowRankStrategy(**{field: value}),
                 lambda: LowRankCallback(LowRankConfig(**{field: value}))):
        with pytest.raises(ValueError, match=f"'{field}'.*configure_optimizers owns"):
            make()


def test_a_config_at_its_defaults_is_accepted():
    config = LowRankConfig(rank=1, targets=["layer"], method="fira")  # fields the method fills are not "set"
    assert LowRankCallback(config).config.rank == 1
    with pytest.raises(ValueError, match=r"\['betas'\] set on the low-rank callback"):
        LowRankCallback(LowRankConfig(betas=[0.9, 0.999]))  # a list, as YAML gives it: the user's optimizer owns betas


@pytest.mark.slow
def test_callback_with_lowrank_strategy_is_refused_naming_both():
    with pytest.raises(ValueError, match="LowRankCallback and strategy='lowrank'"):
        fit(Boring(), strategy="lowrank", callbacks=[LowRankCallback(targets=["layer"], rank=1)])


@pytest.mark.slow
def test_a_module_already_returning_a_low_rank_optimizer_is_refused():
    with pytest.raises(ValueError, match="already returns a LowRankOptimizer"):
        fit(Boring(lambda p: LowRankOptimizer(p)), callbacks=[LowRankCallback(targets=["layer"], rank=1)])
    with pytest.raises(ValueError, match="more than one LowRankCallback"):
        fit(Boring(), callbacks=[LowRankCallback(targets=["layer"]), LowRankCallback(targets=["layer"])])


@pytest.mark.parametrize("adoption", ["callback", "strategy"])
def test_lr_find_sweeps_the_low_rank_optimizer(adoption, tmp_path):
    options = dict(targets=["layer"], rank=1)
    model = Boring()
    trainer = pl.Trainer(max_steps=5, default_root_dir=tmp_path, **QUIET,
                         **({"callbacks": [LowRankCallback(**options)]} if adoption == "callback"
                            else {"strategy": LowRankStrategy(**options)}))
    finder = Tuner(trainer).lr_find(model, train_dataloaders=DataLoader(RandomDataset(32, 64), batch_size=8),
                                    num_training=5, early_stop_threshold=None, update_attr=False)
    assert len(finder.results["lr"]) == 5
    assert set(model.stepping) == {LowRankOptimizer}


class ConvBoring(pl.LightningModule):
    """A user's module with conv kernels and a linear layer, trained by AdamW."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv1d(4, 8, 3, padding=1)
        self.proj = torch.nn.Linear(8, 2)

    def training_step(self, batch, batch_idx):
        features = self.conv(batch.view(-1, 4, 8)).mean(dim=2)
        return self.proj(features).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.01)


@pytest.mark.slow
def test_a_users_conv_kernels_are_converted_into_their_own_group_and_train():
    model = ConvBoring()
    start = model.conv.weight.detach().clone()
    trainer = fit(model, callbacks=[LowRankCallback(targets=["conv", "proj"], rank=2, update_gap=2)])
    groups = {g["name"]: g for g in trainer.optimizers[0].param_groups}
    assert list(groups) == ["pg1", "pg1-kernel", "pg1-dense"]
    assert groups["pg1-kernel"]["layout"] == "kernel" and groups["pg1-kernel"]["params"] == [model.conv.weight]
    assert "layout" not in groups["pg1"] and groups["pg1"]["params"] == [model.proj.weight]
    assert trainer.optimizers[0].projectors[model.conv.weight].bases()[0].shape == (8, 2)  # out × r of 8×12
    assert not torch.equal(model.conv.weight, start)
