"""Weights sharded by rows with FSDP2's ``fully_shard`` (gloo, 2 CPU processes): each rank steps
its rows and trains what one process trains on the whole batch, with its state split over the
ranks; checkpoints of the sharded state (distributed and full) resume exactly; what a rank cannot
step on its rows alone is refused when the optimizer is built."""

from __future__ import annotations

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_optimizer_state_dict, get_state_dict, set_optimizer_state_dict, set_state_dict,
)

from lit_lowrank import LowRankOptimizer, build_optimizer
from lit_lowrank.optim.communication import LowRankCommunication
from lit_lowrank.optim.layerwise import LayerwiseUpdates
from lit_lowrank.optim.sharding import chunk_bounds
from ranks import requires_gloo, run_ranks

STEPS = 5
OPTIONS = dict(targets=["attn", "mlp"], rank=3, update_gap=2, lr=1e-2)
METHODS = {  # name → options on top of OPTIONS
    "galore": dict(method="galore", weight_decay=0.1),  # attn 17×12: right (G Q); mlp 5×17: left (Lᵀ G)
    "galore-rotate": dict(method="galore", on_refresh="rotate"),
    "galore-both-reset": dict(method="galore", side="full", on_refresh="reset"),
    "galore-coupled-l2-sgd": dict(method="galore", inner="sgd", inner_args={"momentum": 0.9}, weight_decay=0.1,
                                  coupled=True),
    "fira": dict(method="fira"),
    "apollo": dict(method="apollo"),
    "apollo-mini": dict(method="apollo-mini", rank=1),
    "galore-lion-random": dict(method="galore-random", inner="lion"),
    "galore-rsvd-momentum": dict(method="galore-rsvd", inner="momentum"),
    "galore-dct-adamw-hf": dict(method="galore-dct", inner="adamw-hf"),
    "online-pca": dict(method="online-pca"),
    "adaptive-rank": dict(method="adaptive-rank"),
    "srht-int4-bases-lazy": dict(method="galore", projector="srht", schedule="lazy",
                                 projector_args={"quantizer": "int", "quantizer_args": {"bits": 4, "group_size": 4}}),
}


class Block(nn.Module):
    """By default row counts that do not split evenly over two ranks (17 → 9 + 8, 5 → 3 + 2)."""

    def __init__(self, hidden: int = 17, out: int = 5) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.attn = nn.Linear(12, hidden, dtype=torch.float64)
        self.mlp = nn.Linear(hidden, out, dtype=torch.float64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(torch.tanh(self.attn(x)))


def build(model: nn.Module, name: str) -> LowRankOptimizer:
    options = {**OPTIONS, **METHODS[name]}
    coupled = options.pop("coupled", False)
    optimizer = build_optimizer(model, **options)
    for group in optimizer.param_groups:
        group["decoupled_weight_decay"] = not coupled  # torch SGD's L2: G + λW is projected
    return optimizer


def batches(steps: int = STEPS) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [(torch.randn(8, 12, generator=generator, dtype=torch.float64),
             torch.randn(8, 5, generator=generator, dtype=torch.float64)) for _ in range(steps)]


def train(model: nn.Module, optimizer, batch_list, rank: int = 0, world_size: int = 1) -> None:
    for inputs, targets in batch_list:
        optimizer.zero_grad()
        nn.functional.mse_loss(model(inputs[rank::world_size]), targets[rank::world_size]).backward()
        optimizer.step()


def sharded_block(mesh=None, model: Block | None = None) -> Block:
    from torch.distributed.fsdp import fully_shard

    model = model or Block()
    fully_shard(model.attn, mesh=mesh)
    fully_shard(model.mlp, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def whole(p: torch.Tensor) -> torch.Tensor:
    return p.full_tensor().detach()


def _train_worker(rank: int, world_size: int, out: str, name: str) -> None:
    model = sharded_block()
    optimizer = build(model, name)
    train(model, optimizer, batches(), rank, world_size)
    moments = {key: value.shape for key, value in optimizer.state[model.attn.weight].items()
               if isinstance(value, torch.Tensor) and value.ndim}
    torch.save({"params": [whole(p) for p in model.parameters()], "moments": moments,
                "state_bytes": optimizer.state_bytes(), "refreshes": optimizer.refresh_count}, f"{out}/rank{rank}.pt")


@pytest.mark.slow
@requires_gloo
@pytest.mark.parametrize("name", list(METHODS))
def test_fully_shard_trains_what_one_process_trains(tmp_path, name):
    run_ranks(_train_worker, str(tmp_path), name)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    model = Block()
    optimizer = build(model, name)
    train(model, optimizer, batches())
    for ours, single in zip(ranks[0]["params"], model.parameters()):
        torch.testing.assert_close(ours, single.detach(), rtol=1e-8, atol=1e-10)  # float64: summation order only
    assert ranks[0]["refreshes"] == optimizer.refresh_count >= 2 * 3  # two targets, at least at steps 0, 2, 4
    single_bytes, shares = optimizer.state_bytes(), [r["state_bytes"] for r in ranks]
    for role in ("moments", "dense"):  # the state is split over the ranks, not copied
        assert shares[0][role] + shares[1][role] == single_bytes[role]
    assert shares[0]["projectors"] == single_bytes["projectors"]  # every rank keeps the whole bases


@pytest.mark.slow
@requires_gloo
def test_left_projection_moments_cover_a_block_of_columns(tmp_path):
    run_ranks(_train_worker, str(tmp_path), "galore-both-reset")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    # attn (17×12), side full: R is 3×3 on every rank; each keeps moments for its block of R's columns
    widths = [ranks[r]["moments"]["exp_avg"] for r in (0, 1)]
    assert [tuple(w) for w in widths] == [(3, len(range(3)[chunk_bounds(3, 2, r)])) for r in (0, 1)] == [(3, 2), (3, 1)]


def _hsdp_worker(rank: int, world_size: int, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))  # 2 replicas of 2 row shards
    trained = {}
    for name in ("galore", "fira", "apollo-mini"):
        model = sharded_block(mesh)
        train(model, build(model, name), batches(), rank, world_size)
        trained[name] = [whole(p) for p in model.parameters()]
    torch.save(trained, f"{out}/rank{rank}.pt")


@pytest.mark.slow
@requires_gloo
def test_hsdp_replicas_of_row_shards_train_what_one_process_trains(tmp_path):
    run_ranks(_hsdp_worker, str(tmp_path), world_size=4)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(4)]
    for name, weights in ranks[0].items():
        model = Block()
        train(model, build(model, name), batches())
        for ours, single in zip(weights, model.parameters()):
            torch.testing.assert_close(ours, single.detach(), rtol=1e-8, atol=1e-10)
        assert all(torch.equal(a, b) for other in ranks[1:] for a, b in zip(weights, other[name]))


class ExpertsAndKernel(nn.Module):
    """A conv kernel (9×7×3: 9 output rows, 5 + 4 over two ranks) and a stack of 3 experts
    (3×5×9: 2 + 1 over two ranks) — the layouts ``kernel`` and ``experts``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv1d(7, 9, 3, dtype=torch.float64)
        self.experts = nn.Module()
        self.experts.stack = nn.Parameter(0.3 * torch.randn(3, 5, 9, dtype=torch.float64))  # as MixtralExperts holds them

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = torch.tanh(self.conv(x.reshape(-1, 7, 4))).mean(-1)  # (B, 9)
        return torch.einsum("emn,bn->bm", self.experts.stack, hidden)


LAYOUT_METHODS = ["galore", "fira", "apollo", "galore-rsvd"]


def layout_batches(steps: int = STEPS) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [(torch.randn(8, 28, generator=generator, dtype=torch.float64),
             torch.randn(8, 5, generator=generator, dtype=torch.float64)) for _ in range(steps)]


def build_layouts(model: nn.Module, name: str) -> LowRankOptimizer:
    return build_optimizer(model, method=name, targets=["conv", "experts"], rank=2, update_gap=2, lr=1e-2)


def sharded_layouts() -> ExpertsAndKernel:
    from torch.distributed.fsdp import fully_shard

    model = ExpertsAndKernel()
    fully_shard(model.conv)
    fully_shard(model)  # holds the experts, which its forward uses directly
    return model


def _layouts_worker(rank: int, world_size: int, out: str) -> None:
    trained = {}
    for name in LAYOUT_METHODS:
        model = sharded_layouts()
        optimizer = build_layouts(model, name)
        assert sorted(g.get("layout", "matrix") for g in optimizer.param_groups if g["lowrank"]) == ["experts", "kernel"]
        train(model, optimizer, layout_batches(), rank, world_size)
        trained[name] = ([whole(p) for p in model.parameters()], optimizer.state_bytes())
    torch.save(trained, f"{out}/rank{rank}.pt")


@pytest.mark.slow
@requires_gloo
def test_sharded_experts_and_kernels_train_what_one_process_trains(tmp_path):
    run_ranks(_layouts_worker, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    for name in LAYOUT_METHODS:
        model = ExpertsAndKernel()
        optimizer = build_layouts(model, name)
        train(model, optimizer, layout_batches())
        for ours, single in zip(ranks[0][name][0], model.parameters()):
            torch.testing.assert_close(ours, single.detach(), rtol=1e-8, atol=1e-10)
        shares = [r[name][1] for r in ranks]
        assert shares[0]["moments"] + shares[1]["moments"] == optimizer.state_bytes()["moments"]


def resume_setup(kind: str, world_size: int):
    """``(make a sharded model, build its optimizer, six batches)``: the Block (over an HSDP mesh on
    four ranks) or the experts and kernel."""
    from torch.distributed.device_mesh import init_device_mesh

    if kind == "layouts":
        return sharded_layouts, build_layouts, layout_batches(6)
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard")) if world_size == 4 else None  # HSDP
    return (lambda: sharded_block(mesh)), build, batches(6)


def one_row() -> Block:
    """A 1×6 target and its bias: rank 1 holds none of their rows."""
    return Block(hidden=6, out=1)


def one_row_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x, y[:, :1]) for x, y in batches()]


def _empty_shard_worker(rank: int, world_size: int, out: str) -> None:
    trained = {}
    for name in ("galore", "fira", "apollo-mini"):
        model = sharded_block(model=one_row())
        assert model.mlp.weight.to_local().shape[0] == 1 - rank
        train(model, build(model, name), one_row_batches(), rank, world_size)
        trained[name] = [whole(p) for p in model.parameters()]
    torch.save(trained, f"{out}/rank{rank}.pt")


@pytest.mark.slow
@requires_gloo
def test_a_rank_holding_no_rows_of_a_weight_still_trains_it_exactly(tmp_path):
    run_ranks(_empty_shard_worker, str(tmp_path))
    for name, weights in torch.load(tmp_path / "rank0.pt").items():
        model = one_row()
        train(model, build(model, name), one_row_batches())
        for ours, single in zip(weights, model.parameters()):
            torch.testing.assert_close(ours, single.detach(), rtol=1e-8, atol=1e-10)


def _resume_worker(rank: int, world_size: int, out: str, name: str, full: bool, kind: str = "block") -> None:
    make, build_for, batch_list = resume_setup(kind, world_size)
    first, rest = batch_list[:3], batch_list[3:]
    model = make()
    optimizer = build_for(model, name)
    train(model, optimizer, first, rank, world_size)
    if full:  # one whole state dict, as ModelParallelStrategy(save_distributed_checkpoint=False) writes it
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        saved = get_optimizer_state_dict(model, optimizer, options=options)
        if rank == 0:
            torch.save(saved, f"{out}/optimizer.pt")
        saved_weights = [whole(p) for p in model.parameters()]
    else:
        model_state, optimizer_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=f"{out}/dcp")
    train(model, optimizer, rest, rank, world_size)
    uninterrupted = [whole(p) for p in model.parameters()]

    model = make()
    optimizer = build_for(model, name)
    if full:
        torch.distributed.barrier()
        with torch.no_grad():
            for p, saved_p in zip(model.parameters(), saved_weights):
                p.copy_(torch.distributed.tensor.distribute_tensor(saved_p, p.device_mesh, p.placements))
        state = torch.load(f"{out}/optimizer.pt", weights_only=True) if rank == 0 else {}
        set_optimizer_state_dict(model, optimizer, state,
                                 options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    else:
        model_state, optimizer_state = get_state_dict(model, optimizer)
        loaded = {"model": model_state, "optimizer": optimizer_state}
        dcp.load(loaded, checkpoint_id=f"{out}/dcp")
        set_state_dict(model, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optimizer"])
    train(model, optimizer, rest, rank, world_size)
    for resumed, reference in zip(model.parameters(), uninterrupted):
        assert torch.equal(whole(resumed), reference), "the resumed run left the uninterrupted one"


@pytest.mark.slow
@requires_gloo
@pytest.mark.parametrize("full", [False, True], ids=["distributed", "full"])
@pytest.mark.parametrize("name", ["galore", "fira"])
def test_checkpoints_of_sharded_state_resume_exactly(tmp_path, name, full):
    run_ranks(_resume_worker, str(tmp_path), name, full)


@pytest.mark.slow
@requires_gloo
@pytest.mark.parametrize("full", [False, True], ids=["distributed", "full"])
def test_checkpoints_of_sharded_experts_and_kernels_resume_exactly(tmp_path, full):
    run_ranks(_resume_worker, str(tmp_path), "fira", full, "layouts")  # per-expert limiter norms (E×1×1) split too


@pytest.mark.slow
@requires_gloo
def test_hsdp_checkpoints_resume_exactly(tmp_path):
    run_ranks(_resume_worker, str(tmp_path), "fira", False, world_size=4)


def _nonfinite_worker(rank: int, world_size: int) -> None:
    model = sharded_block()
    optimizer = build_optimizer(model, **OPTIONS, method="galore")
    train(model, optimizer, batches(1), rank, world_size)
    before = [whole(p) for p in model.parameters()]
    optimizer.zero_grad()
    nn.functional.mse_loss(model(batches(1)[0][0]), batches(1)[0][1]).backward()
    if rank == 1:  # only rank 1's rows hold the NaN: both ranks must skip the step
        model.attn.weight.grad.to_local()[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="non-finite gradient in attn.weight"):
        optimizer.step()
    assert optimizer.skipped_steps == 1
    assert all(torch.equal(whole(p), b) for p, b in zip(model.parameters(), before))


@pytest.mark.slow
@requires_gloo
def test_a_nonfinite_gradient_on_one_rank_skips_the_step_on_every_rank():
    run_ranks(_nonfinite_worker)


def _refusal_worker(rank: int, world_size: int) -> None:
    model = sharded_block()
    for options, match in [
        (dict(inner="adafactor"), "elementwise inner.*'adamw'"),
        (dict(rule="snsm", inner="momentum"), "shardable rule.*'galore'"),
        (dict(projector="tucker"), "does not project with plain bases.*'svd'"),
        (dict(side="full", on_refresh="rotate"), "rotate with side: full.*keep or reset"),
    ]:
        with pytest.raises(ValueError, match=match):
            build_optimizer(model, **{**OPTIONS, **options})
    optimizer = build_optimizer(model, **OPTIONS)
    with pytest.raises(ValueError, match="layer-wise.*sharded by FSDP.*ddp_lowrank"):
        LayerwiseUpdates(optimizer)
    with pytest.raises(ValueError, match="comm hook.*sharded by FSDP"):
        LowRankCommunication(optimizer)
    early = Block()
    optimizer = build_optimizer(early, **OPTIONS)  # built before fully_shard replaced the parameters
    with pytest.warns(RuntimeWarning, match="no gradient on any.*build the optimizer afterwards"):
        train(sharded_block(model=early), optimizer, batches(1), rank, world_size)
    half = nn.Linear(4, 4)  # a parameter fully_shard does not hold: its gradient would not be averaged
    with pytest.raises(ValueError, match="whole on this rank.*fully_shard to the root module"):
        LowRankOptimizer([{"params": [*model.parameters(), half.weight], "lowrank": False}])


@pytest.mark.slow
@requires_gloo
def test_what_a_rank_cannot_step_alone_is_refused_when_built():
    run_ranks(_refusal_worker)


def test_flat_parameters_are_refused():
    weight = nn.Parameter(torch.zeros(4, 3))
    weight._fsdp_flattened = True  # what FSDP1 marks the original parameters it flattened with
    with pytest.raises(ValueError, match="FSDP1 flat parameter.*fully_shard"):
        LowRankOptimizer([{"params": [weight], "lowrank": True}])
