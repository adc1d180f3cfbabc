"""The matrix's "plain DDP with the hook" column: every registered method built by
``build_optimizer(model, method=m)``, the model wrapped in torch's ``DistributedDataParallel`` with
``lowrank_comm_hook`` registered (docs/scaling.md), trains what the same optimizer trains without
DDP — or registering the hook is refused, naming the obstacle. One process, a world of 1: the
average over ranks is the rank's own gradient, so any difference from the reference is the hook's
(a step that read the lift ``P R`` in ``p.grad`` where it needs ``G`` differs at once). New
methods join by registering."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lit_lowrank import build_optimizer, plugins, transforms
from lit_lowrank.optim.communication import LowRankCommunication, lowrank_comm_hook
from ranks import requires_gloo


def _load_method_matrix():
    """tests/lightning/test_method_matrix.py (its model and per-group view), loaded by path: its
    folder is not importable by name (``lightning`` is the installed package)."""
    path = Path(__file__).parents[1] / "lightning" / "test_method_matrix.py"
    spec = importlib.util.spec_from_file_location("method_matrix", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


method_matrix = _load_method_matrix()

STEPS = 4
OPTIONS = {"update_gap": 2}
"""Steps 0 and 2 refresh (full gradients sent), steps 1 and 3 read the averaged ``R``."""


@pytest.fixture
def world_of_one(tmp_path):
    """A gloo process group of this process alone, destroyed after the test."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def options(method: str) -> dict:
    """The overrides both optimizers get: a short refresh gap, rank 4 unless the method sets one."""
    return {**OPTIONS, **({"rank": 4} if "rank" not in plugins.get_method(method).settings() else {})}


def prepared(method: str) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A seeded Net holding ``method``'s transforms and its ``build_optimizer`` optimizer, bound."""
    torch.manual_seed(0)
    net = method_matrix.Net()
    method_transforms = plugins.get_method(method).transforms
    transforms.prepare(net, method_transforms)
    optimizer = build_optimizer(net, method=method, **options(method))
    transforms.bind(net, method_transforms, optimizer)
    return net, optimizer


def train(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """:data:`STEPS` MSE steps on seeded random batches (8×16 → 8×2)."""
    generator = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        inputs, targets = torch.randn(8, 16, generator=generator), torch.randn(8, 2, generator=generator)
        optimizer.zero_grad()
        nn.functional.mse_loss(model(inputs), targets).backward()
        optimizer.step()


def wrapped(net: nn.Module) -> DistributedDataParallel:
    """``DistributedDataParallel(net)``; without its initial broadcast for weights stored in another
    format (int-weights' weight is a stride-0 handle the broadcast cannot write into; in a world of
    1 the broadcast copies the weights onto themselves, so skipping it changes nothing here)."""
    stored = any(transforms.stored_weight(p) is not None for p in net.parameters())
    return DistributedDataParallel(net, init_sync=not stored)


def hidden_gradients(net: nn.Module) -> list[str]:
    """Names of the weights a transform steps without a ``.grad`` (CompAct's)."""
    return [name for name, p in net.named_parameters() if transforms.gradient_hidden(p)]


@requires_gloo
@pytest.mark.parametrize("method", sorted(plugins.registered("methods")))
def test_the_ddp_hook_trains_the_method_build_optimizer_builds(method, world_of_one):
    """Accepted: the same per-group components as without DDP, the same weights and stored state
    after refresh and non-refresh steps, and the hook communicated. Refused at registration: a
    method whose transform hides gradients, the message naming those weights and the missing .grad."""
    reference_net, reference = prepared(method)
    net, optimizer = prepared(method)
    ddp = wrapped(net)
    hidden = hidden_gradients(net)
    if hidden:
        with pytest.raises(ValueError, match=r"without a \.grad") as refusal:
            ddp.register_comm_hook(LowRankCommunication(optimizer), lowrank_comm_hook)
        assert all(name in str(refusal.value) for name in hidden)
        return
    ddp.register_comm_hook(LowRankCommunication(optimizer), lowrank_comm_hook)
    train(reference_net, reference)
    train(ddp, optimizer)
    assert optimizer.comm_bytes > 0
    assert method_matrix._plain(method_matrix.lowrank_components(optimizer)) == method_matrix._plain(
        method_matrix.lowrank_components(reference))
    ours, theirs = net.state_dict(), reference_net.state_dict()
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        torch.testing.assert_close(ours[key], value, rtol=1e-6, atol=1e-6 * value.abs().max().item(), msg=key)


@requires_gloo
@pytest.mark.parametrize("method", sorted(plugins.registered("methods")))
def test_lightnings_ddp_refuses_a_method_exactly_when_torch_cannot_wrap_its_model(method, world_of_one):
    """The Lightning DDP column: ``ddp_lowrank`` with ``method=m`` is refused before the model is
    wrapped exactly when ``DistributedDataParallel`` (its start-up broadcast) fails on a model
    holding m's transforms — with an error naming the fix instead of torch's."""
    from lit_lowrank.lightning import DDPLowRankStrategy
    from lit_lowrank.lightning.refusals import check_strategy

    net, _ = prepared(method)
    try:
        DistributedDataParallel(net)
        torch_error = None
    except RuntimeError as error:
        torch_error = error
    strategy = DDPLowRankStrategy(method=method)
    if torch_error is None:
        check_strategy(strategy, strategy.lowrank)
        return
    with pytest.raises(ValueError, match=r"cannot be trained under DDP.*strategy='lowrank'"):
        check_strategy(strategy, strategy.lowrank)
