"""LowRankOptimizer with the GaLore rule against a plain reference written here."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from lit_lowrank import LowRankOptimizer, build_optimizer
from references import AdamMoments, svd_basis


def reference_galore(weight, grads, *, rank, gap, scale, lr, betas, eps, weight_decay, policy="std"):
    """GaLore, Alg. 1 of Zhao et al. 2024, one weight, written out step by step."""
    m_rows, n_cols = weight.shape
    right = m_rows >= n_cols if policy == "std" else policy == "right"
    adam, basis, trajectory = AdamMoments(betas, eps), None, []
    for t, grad in enumerate(grads, start=1):
        if (t - 1) % gap == 0:
            basis = svd_basis(grad, rank, right)
        low = grad @ basis if right else basis.T @ grad
        direction = adam.direction(low, t)
        lifted = direction @ basis.T if right else basis @ direction
        weight = weight * (1 - lr * weight_decay) - lr * scale * lifted
        trajectory.append(weight)
    return trajectory


@pytest.mark.parametrize("shape", [(24, 16), (16, 24)])
@pytest.mark.parametrize("policy", ["std", "left", "right"])
def test_galore_step_matches_reference(shape, policy):
    torch.manual_seed(0)
    options = dict(rank=4, gap=3, scale=0.25, lr=0.01, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    weight = nn.Parameter(torch.randn(*shape, dtype=torch.float64))
    grads = [torch.randn(*shape, dtype=torch.float64) for _ in range(8)]
    expected = reference_galore(weight.detach().clone(), grads, policy=policy, **options)
    optimizer = LowRankOptimizer(
        [{"params": [weight], "lowrank": True}], lr=options["lr"], betas=options["betas"], eps=options["eps"],
        weight_decay=options["weight_decay"], rank=options["rank"], update_gap=options["gap"],
        scale=options["scale"], side=policy,
    )
    for grad, want in zip(grads, expected):
        weight.grad = grad
        optimizer.step()
        torch.testing.assert_close(weight.detach(), want, rtol=0, atol=1e-6)
    assert optimizer.refresh_count == 3  # steps 1, 4, 7


class TinyBlock(nn.Module):
    """Named like a transformer block; not inside repeated blocks, so its targets are named."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 32)
        self.attn = nn.Linear(32, 32)
        self.mlp = nn.Sequential(nn.Linear(32, 48), nn.GELU(), nn.Linear(48, 32))
        self.norm = nn.LayerNorm(32)
        self.lm_head = nn.Linear(32, 50, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        h = h + self.attn(h)
        h = h + self.mlp(self.norm(h))
        return self.lm_head(h)


def _loss(model: nn.Module, batch: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(batch)
    tokens = torch.randint(0, 50, (4, 6), generator=generator)
    logits = model(tokens[:, :-1])
    return nn.functional.cross_entropy(logits.reshape(-1, 50), tokens[:, 1:].reshape(-1))


def _train(model, optimizer, batches):
    losses = []
    for batch in batches:
        optimizer.zero_grad()
        loss = _loss(model, batch)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_build_optimizer_splits_targets_and_dense():
    model = TinyBlock()
    optimizer = build_optimizer(model, targets=["attn", "mlp"], rank=8)
    lowrank, dense = optimizer.param_groups
    assert lowrank["lowrank"] and not dense["lowrank"]
    assert lowrank["names"] == ["attn.weight", "mlp.0.weight", "mlp.2.weight"]
    assert set(dense["names"]) == {"embed.weight", "attn.bias", "mlp.0.bias", "mlp.2.bias", "norm.weight",
                                   "norm.bias", "lm_head.weight"}


def test_build_optimizer_without_targets_is_an_error():
    with pytest.raises(ValueError, match="no trainable 2-D weight of Sequential matches"):
        build_optimizer(nn.Sequential(nn.Linear(4, 4)), targets=["q_proj"])


def test_non_matrix_in_lowrank_group_is_refused():
    with pytest.raises(ValueError, match="layout .matrix. takes 2-D"):
        LowRankOptimizer([{"params": [nn.Parameter(torch.zeros(4))], "lowrank": True}])


def test_rank_above_min_dimension_is_clamped_with_a_warning():
    weight = nn.Parameter(torch.randn(6, 4))
    optimizer = LowRankOptimizer([{"params": [weight], "lowrank": True}], rank=16)
    weight.grad = torch.randn(6, 4)
    with pytest.warns(UserWarning, match="rank 16 exceeds .* clamped to 4"):
        optimizer.step()
    assert optimizer.state[weight]["exp_avg"].shape == (6, 4)


def test_optimizer_state_bytes_match_the_closed_form():
    """GaLore std: moments 2·r·max(m,n), basis r·min(m,n) per target matrix (float32)."""
    model, rank = TinyBlock(), 8
    optimizer = build_optimizer(model, targets=["attn", "mlp"], rank=rank)
    _train(model, optimizer, [0])
    shapes = [(32, 32), (48, 32), (32, 48)]
    sizes = optimizer.state_bytes()
    assert sizes["moments"] == sum(2 * rank * max(m, n) * 4 for m, n in shapes)
    assert sizes["projectors"] == sum(rank * min(m, n) * 4 for m, n in shapes)
    dense_numel = sum(p.numel() for p in optimizer.param_groups[1]["params"])
    assert sizes["dense"] == 2 * dense_numel * 4


@pytest.mark.parametrize("on_refresh", ["keep", "reset", "rotate"])
def test_resume_is_bitwise_exact(on_refresh):
    options = dict(targets=["attn", "mlp"], rank=4, update_gap=3, lr=1e-2, weight_decay=0.01, on_refresh=on_refresh)
    model = TinyBlock()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    full = _train(model, build_optimizer(model, **options), range(8))
    final = {k: v.clone() for k, v in model.state_dict().items()}

    model.load_state_dict(initial)
    optimizer = build_optimizer(model, **options)
    first = _train(model, optimizer, range(4))
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)  # tensors and plain values only

    resumed_model = TinyBlock()
    resumed_model.load_state_dict(checkpoint["model"])
    resumed_optimizer = build_optimizer(resumed_model, **options)
    resumed_optimizer.load_state_dict(checkpoint["optimizer"])
    second = _train(resumed_model, resumed_optimizer, range(4, 8))
    assert first + second == full
    for key, value in resumed_model.state_dict().items():
        assert torch.equal(value, final[key]), key
    assert resumed_optimizer.refresh_count == 3 * 3  # 3 matrices refreshed at steps 1, 4, 7


def test_on_refresh_modes_transform_the_moments():
    torch.manual_seed(1)
    weight = nn.Parameter(torch.randn(10, 16))
    grads = [torch.randn(10, 16) for _ in range(3)]
    states = {}
    for mode in ("keep", "reset", "rotate"):
        w = nn.Parameter(weight.detach().clone())
        optimizer = LowRankOptimizer([{"params": [w], "lowrank": True}], rank=3, update_gap=2, on_refresh=mode)
        for grad in grads[:2]:
            w.grad = grad
            optimizer.step()
        before = {k: optimizer.state[w][k].clone() for k in ("exp_avg", "exp_avg_sq")}
        old_basis = optimizer.projectors[w].bases()[0]  # 10×16: std projects the left side
        w.grad = grads[2]
        optimizer.step()
        new_basis = optimizer.projectors[w].bases()[0]
        states[mode] = (before, old_basis, new_basis, optimizer.state[w])
    beta1, beta2 = 0.9, 0.999
    (before, old, new, after) = states["rotate"]
    low = new.T @ grads[2]
    change = new.T @ old
    torch.testing.assert_close(after["exp_avg"], beta1 * change @ before["exp_avg"] + (1 - beta1) * low)
    torch.testing.assert_close(
        after["exp_avg_sq"], beta2 * (change.square() @ before["exp_avg_sq"]) + (1 - beta2) * low.square()
    )
    (before, _, new, after) = states["reset"]
    low = new.T @ grads[2]
    torch.testing.assert_close(after["exp_avg"], (1 - beta1) * low)
    (before, _, new, after) = states["keep"]
    low = new.T @ grads[2]
    torch.testing.assert_close(after["exp_avg"], beta1 * before["exp_avg"] + (1 - beta1) * low)


def test_dense_group_equals_torch_adamw():
    torch.manual_seed(0)
    a, b = nn.Parameter(torch.randn(5, 3)), nn.Parameter(torch.randn(5, 3))
    b.data.copy_(a.data)
    ours = LowRankOptimizer([a], lr=0.1, weight_decay=0.1)
    theirs = torch.optim.AdamW([b], lr=0.1, weight_decay=0.1)
    for _ in range(5):
        grad = torch.randn(5, 3)
        a.grad, b.grad = grad.clone(), grad.clone()
        ours.step()
        theirs.step()
    torch.testing.assert_close(a.detach(), b.detach())
