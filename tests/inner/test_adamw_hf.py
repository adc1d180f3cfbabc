"""``adamw-hf``: runs of galore-torch, fira and apollo-torch reproduced at the peers' own defaults
(ε = 1e-6, weight decay after the step, dense params on HF AdamW), and the convention itself
against a plain HF AdamW step written here."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lit_lowrank import LowRankOptimizer, build_optimizer
from lit_lowrank.optim import LayerwiseUpdates
from lit_lowrank.inner.adamw_hf import HFAdamInner

STEPS, GAP, RANK = 24, 8, 4  # refreshes at steps 1, 9 and 17
PEER_OPTIONS = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.1)  # the peers' default ε


def _mlp() -> nn.Module:
    """40×20 and 30×12 (m > n: right projection), 12×40 (m < n: left), and a dense head."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 40), nn.Tanh(), nn.Linear(40, 12), nn.Tanh(), nn.Linear(12, 30), nn.Tanh(),
                         nn.Linear(30, 6))


def _split(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(the three hidden weights, everything else: biases and the head)."""
    matrices = [model[0].weight, model[2].weight, model[4].weight]
    return matrices, [p for p in model.parameters() if all(p is not w for w in matrices)]


def _ours(model: nn.Module, correct_bias: bool, **options) -> LowRankOptimizer:
    matrices, dense = _split(model)
    return LowRankOptimizer([{"params": matrices, "lowrank": True}, {"params": dense}], rank=RANK,
                            update_gap=GAP, inner="adamw-hf", inner_args={"correct_bias": correct_bias},
                            **PEER_OPTIONS, **options)


def _peer_groups(model: nn.Module, **lowrank_options) -> list[dict]:
    matrices, dense = _split(model)
    return [{"params": matrices, "rank": RANK, "update_proj_gap": GAP, **lowrank_options}, {"params": dense}]


@pytest.mark.parametrize("correct_bias", [True, False])
def test_reproduces_galore_torch(correct_bias, assert_same_trajectory):
    galore_torch = pytest.importorskip("galore_torch")
    ours_model, peer_model = _mlp(), _mlp()
    ours = _ours(ours_model, correct_bias, scale=0.25)
    peer = galore_torch.GaLoreAdamW(_peer_groups(peer_model, scale=0.25, proj_type="std"), correct_bias=correct_bias,
                                    no_deprecation_warning=True, **PEER_OPTIONS)
    assert_same_trajectory(ours_model, ours, peer_model, peer, outputs=6, steps=STEPS)
    assert ours.refresh_count == 3 * 3


@pytest.mark.parametrize("correct_bias", [True, False])
def test_reproduces_fira(correct_bias, assert_same_trajectory):
    """The bias correction multiplies fira's whole update, after φ and the limiter: the
    correction must not enter N (it would change φ's units and the limiter's history)."""
    fira = pytest.importorskip("fira")
    ours_model, peer_model = _mlp(), _mlp()
    ours = _ours(ours_model, correct_bias, scale=0.25, rule="fira", rule_args={"scaled_residual": True})
    peer = fira.FiraAdamW(_peer_groups(peer_model, alpha=0.25, proj_type="std"), correct_bias=correct_bias,
                          no_deprecation_warning=True, **PEER_OPTIONS)
    assert_same_trajectory(ours_model, ours, peer_model, peer, outputs=6, steps=STEPS)


@pytest.mark.parametrize("scale_type", ["channel", "tensor"])
@pytest.mark.parametrize("correct_bias", [True, False])
def test_reproduces_apollo_torch(scale_type, correct_bias, apollo_torch_draws_ours, assert_same_trajectory):
    apollo_torch = pytest.importorskip("apollo_torch")  # CC-BY-NC: never a dependency
    apollo_torch_draws_ours(rank=RANK)
    ours_model, peer_model = _mlp(), _mlp()
    ours = _ours(ours_model, correct_bias, scale=4.0, projector="random", rule="apollo",
                 rule_args={"scaling": scale_type})
    peer = apollo_torch.APOLLOAdamW(_peer_groups(peer_model, proj="random", scale_type=scale_type, scale=4.0,
                                                 proj_type="std"), correct_bias=correct_bias, **PEER_OPTIONS)
    assert_same_trajectory(ours_model, ours, peer_model, peer, outputs=6, steps=STEPS)


def _hf_trainer_optimizer(model: nn.Module, optim: str) -> torch.optim.Optimizer:
    """The optimizer HF Trainer builds for ``optim`` (``Trainer.get_optimizer_cls_and_kwargs``,
    as ``Trainer.create_optimizer`` uses it), with ``optim_args="rank=4,update_proj_gap=8"``.
    The Adam and weight-decay arguments are set away from every default, to see which of them
    HF passes on (to galore-torch none, so the equivalent settings are its defaults)."""
    trainer = pytest.importorskip("transformers").Trainer
    args = SimpleNamespace(optim=optim, optim_args=f"rank={RANK},update_proj_gap={GAP}",
                           optim_target_modules=["0", "2", "4"], learning_rate=1e-2, adam_beta1=0.8, adam_beta2=0.9, adam_epsilon=1e-3, weight_decay=0.3,
                           gradient_accumulation_steps=1, parallel_mode=None)
    cls, kwargs = trainer.get_optimizer_cls_and_kwargs(args, model)
    params = kwargs.pop("params")
    params = kwargs.pop("optimizer_dict", params)  # layer-wise: one optimizer per parameter, stepped by hooks
    return cls(params, **kwargs)


@pytest.mark.filterwarnings("ignore:This implementation of AdamW is deprecated:FutureWarning")
@pytest.mark.parametrize("optim", ["galore_adamw", "galore_adamw_layerwise"])
def test_reproduces_hf_trainer_galore_adamw(optim, assert_same_trajectory):
    """The README's row: eps 1e-6, weight decay 0, default betas whatever the TrainingArguments say;
    layer-wise through :class:`LayerwiseUpdates`."""
    pytest.importorskip("galore_torch")
    ours_model, peer_model = _mlp(), _mlp()
    peer = _hf_trainer_optimizer(peer_model, optim)
    ours = build_optimizer(ours_model, targets=["0", "2", "4"], exclude=[], lr=1e-2, rank=RANK, update_gap=GAP,
                           scale=0.25, inner="adamw-hf", eps=1e-6, weight_decay=0.0)
    if optim.endswith("layerwise"):
        LayerwiseUpdates(ours).attach()
    assert_same_trajectory(ours_model, ours, peer_model, peer, outputs=6, steps=STEPS)


def test_reproduces_hf_trainer_galore_adafactor_on_lowrank_weights(assert_same_trajectory):
    """``galore_adafactor``: the projected weights follow ``inner: adafactor``; HF steps the
    other parameters with Adafactor too, which this model does not have (no biases, all targeted)."""
    pytest.importorskip("galore_torch")

    def mlp():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(20, 40, bias=False), nn.Tanh(), nn.Linear(40, 12, bias=False), nn.Tanh(),
                             nn.Linear(12, 6, bias=False))

    ours_model, peer_model = mlp(), mlp()
    peer = _hf_trainer_optimizer(peer_model, "galore_adafactor")
    ours = build_optimizer(ours_model, targets=["0", "2", "4"], exclude=[], lr=1e-2, rank=RANK, update_gap=GAP,
                           scale=0.25, inner="adafactor", weight_decay=0.0)
    assert_same_trajectory(ours_model, ours, peer_model, peer, outputs=6, steps=STEPS)


def test_reproduces_hf_trainer_apollo_adamw(apollo_torch_draws_ours, assert_same_trajectory):
    """``optim="apollo_adamw"``: unlike GaLore's, HF passes ``adam_beta1/2`` and ``adam_epsilon``
    on — to the projected group only; the dense group keeps apollo-torch's defaults. HF's groups
    put the dense params first, which fixes apollo-torch's seeds; the same order here makes the
    draws comparable."""
    pytest.importorskip("apollo_torch")
    apollo_torch_draws_ours(rank=RANK)
    ours_model, peer_model = _mlp(), _mlp()
    peer = _hf_trainer_optimizer(peer_model, "apollo_adamw")
    matrices, dense = _split(ours_model)
    ours = LowRankOptimizer([{"params": dense, "betas": (0.9, 0.999), "eps": 1e-6},
                             {"params": matrices, "lowrank": True, "betas": (0.8, 0.9), "eps": 1e-3}], lr=1e-2,
                            weight_decay=0.0, rank=RANK, update_gap=GAP, scale=1.0, projector="random",
                            rule="apollo", inner="adamw-hf")
    assert_same_trajectory(ours_model, ours, peer_model, peer, outputs=6, steps=STEPS)


def _hf_adamw_step(weight, grad, exp_avg, exp_avg_sq, step, *, lr, betas, eps, weight_decay, correct_bias):
    """One step of ``transformers.AdamW`` (the peers' optimizer), written out."""
    beta1, beta2 = betas
    exp_avg = beta1 * exp_avg + (1 - beta1) * grad
    exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * grad * grad
    step_size = lr * math.sqrt(1 - beta2**step) / (1 - beta1**step) if correct_bias else lr
    weight = weight - step_size * exp_avg / (exp_avg_sq.sqrt() + eps)
    return weight - lr * weight_decay * weight, exp_avg, exp_avg_sq


@pytest.mark.parametrize("correct_bias", [True, False])
def test_dense_step_is_hf_adamw(correct_bias):
    """A dense param of an ``adamw-hf`` group takes HF AdamW's step: ε outside the bias
    correction, decay applied to the updated weight."""
    torch.manual_seed(0)
    options = dict(lr=0.1, betas=(0.9, 0.99), eps=1e-3, weight_decay=0.5, correct_bias=correct_bias)
    dense = nn.Parameter(torch.randn(5, dtype=torch.float64))
    optimizer = LowRankOptimizer([{"params": [dense]}], inner="adamw-hf", inner_args={"correct_bias": correct_bias},
                                 **{k: v for k, v in options.items() if k != "correct_bias"})
    weight, exp_avg, exp_avg_sq = dense.detach().clone(), torch.zeros(5, dtype=torch.float64), 0
    for step in range(1, 5):
        dense.grad = torch.randn(5, dtype=torch.float64) * 1e-2
        weight, exp_avg, exp_avg_sq = _hf_adamw_step(weight, dense.grad, exp_avg, exp_avg_sq, step, **options)
        optimizer.step()
        torch.testing.assert_close(dense.detach(), weight, rtol=0, atol=1e-12)
        torch.testing.assert_close(optimizer.state[dense]["exp_avg_sq"], exp_avg_sq, rtol=0, atol=1e-15)


def test_differs_from_torch_convention():
    """The same run with ``adamw`` (ε on the corrected √V̂, decay before the step) ends elsewhere:
    the migration needs ``adamw-hf``, not just the same numbers."""
    runs = []
    for inner in ("adamw", "adamw-hf"):
        model = _mlp()
        matrices, dense = _split(model)
        optimizer = LowRankOptimizer([{"params": matrices, "lowrank": True}, {"params": dense}], rank=RANK,
                                     update_gap=GAP, inner=inner, **PEER_OPTIONS)
        generator = torch.Generator().manual_seed(1)
        for _ in range(STEPS):
            x, y = torch.randn(16, 20, generator=generator), torch.randn(16, 6, generator=generator)
            optimizer.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            optimizer.step()
        runs.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    initial = torch.cat([p.detach().flatten() for p in _mlp().parameters()])
    moved = (runs[1] - initial).norm()
    assert (runs[0] - runs[1]).norm() > 0.05 * moved


def test_options_are_checked_when_built():
    model = _mlp()
    with pytest.raises(ValueError, match="correct_bias"):
        build_optimizer(model, targets=["0", "2"], inner="adamw-hf", inner_args={"correct_bias": "no"})
    with pytest.raises(ValueError, match="eps"):
        HFAdamInner(eps=-1.0)
    with pytest.raises(ValueError, match="betas"):
        HFAdamInner(betas=(0.9, 1.0))


def test_dense_groups_keep_torch_adamw_with_other_inners():
    """Only an inner optimizer that declares ``steps_dense`` takes over dense groups."""
    param = nn.Parameter(torch.randn(4, dtype=torch.float64))
    reference = nn.Parameter(param.detach().clone())
    ours = LowRankOptimizer([param], lr=0.1, eps=1e-3, weight_decay=0.5, inner="adamw")
    torch_adamw = torch.optim.AdamW([reference], lr=0.1, eps=1e-3, weight_decay=0.5)
    for _ in range(3):
        param.grad = reference.grad = torch.randn(4, dtype=torch.float64)
        ours.step()
        torch_adamw.step()
    torch.testing.assert_close(param, reference, rtol=0, atol=1e-12)


@pytest.mark.parametrize("mode", ["reset", "rotate"])
def test_moments_follow_on_refresh(mode):
    """``exp_avg``/``exp_avg_sq`` are declared linear/quadratic, so reset zeroes and rotate
    maps them like ``adamw``'s."""
    torch.manual_seed(0)
    weight = nn.Parameter(torch.randn(12, 8))
    optimizer = LowRankOptimizer([{"params": [weight], "lowrank": True}], rank=3, update_gap=2, on_refresh=mode,
                                 inner="adamw-hf")
    for _ in range(2):
        weight.grad = torch.randn(12, 8)
        optimizer.step()
    before = {k: optimizer.state[weight][k].clone() for k in ("exp_avg", "exp_avg_sq")}
    old = optimizer.projectors[weight].bases()
    weight.grad = torch.randn(12, 8)
    optimizer.step()  # refresh, then the moment update of step 3
    low = optimizer.projectors[weight].project(weight.grad)
    if mode == "reset":
        before = {k: torch.zeros_like(v) for k, v in before.items()}
    else:
        maps = [None if o is None else n.T @ o for o, n in zip(old, optimizer.projectors[weight].bases())]
        right = maps[1]
        before = {"exp_avg": before["exp_avg"] @ right.T,
                  "exp_avg_sq": (before["exp_avg_sq"] @ right.square().T).clamp(min=0)}
    torch.testing.assert_close(optimizer.state[weight]["exp_avg"], 0.9 * before["exp_avg"] + 0.1 * low)
    torch.testing.assert_close(optimizer.state[weight]["exp_avg_sq"],
                               0.999 * before["exp_avg_sq"] + 0.001 * low * low)
