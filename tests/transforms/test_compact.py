"""CompAct's compressed activations: a model whose linear layers save x Q trains exactly like
GaLore with the same random right projection computed from full gradients, with and without
gradient accumulation; saves r instead of in numbers per token; resumes bitwise; and refuses
what cannot honour it."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lit_lowrank import build_optimizer
from lit_lowrank.transforms.compact import CompactLinear, bind_compact, compact_linear_layers
from lit_lowrank.models import Llama
from lit_lowrank.optim.layerwise import LayerwiseUpdates

RANK, GAP = 4, 2
OPTIONS = dict(projector="random", side="right", rank=RANK, update_gap=GAP, lr=1e-2, weight_decay=0.1, scale=0.5)


def small_llama() -> Llama:
    torch.manual_seed(0)
    return Llama("tiny", vocab_size=64, hidden_size=32, intermediate_size=64, num_heads=2, num_layers=2)


def compact_llama(**options):
    model = small_llama()
    assert len(compact_linear_layers(model)) == 14
    optimizer = build_optimizer(model, **{**OPTIONS, **options})
    bind_compact(model, optimizer)
    return model, optimizer


def tokens(step: int) -> torch.Tensor:
    return torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(step))


def train(model, optimizer, steps: range, accumulation: int = 1) -> None:
    for step in steps:
        for micro in range(accumulation):
            batch = tokens(step * accumulation + micro)
            (model(batch, labels=batch).loss / accumulation).backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.parametrize("accumulation", [1, 3])
@pytest.mark.parametrize("inner", ["adamw", "sgd"])  # SGD's step is linear in R: any error in R shows
def test_compact_layers_train_like_galore_with_the_same_random_projection(accumulation, inner):
    reference = small_llama()
    reference_optimizer = build_optimizer(reference, **OPTIONS, inner=inner)
    model, optimizer = compact_llama(inner=inner)
    train(reference, reference_optimizer, range(5), accumulation)  # refreshes at steps 1, 3, 5
    train(model, optimizer, range(5), accumulation)
    assert optimizer.refresh_count == reference_optimizer.refresh_count == 14 * 3
    for (name, mine), want in zip(model.named_parameters(), reference.parameters()):
        assert not torch.equal(mine, small_llama().get_parameter(name)), name
        torch.testing.assert_close(mine, want, rtol=1e-5, atol=1e-6, msg=name)
    assert all(p.grad is None for p in model.parameters())


def saved_activation_bytes(layer: nn.Module, x: torch.Tensor) -> int:
    """Bytes autograd keeps for backward of one layer call, the layer's parameters excluded."""
    params = {p.data_ptr() for p in layer.parameters()}
    saved = []

    def pack(tensor):
        if tensor.data_ptr() not in params:
            saved.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        layer(x).sum().backward()
    return sum(saved)


def test_a_compact_layer_saves_r_numbers_per_token_instead_of_in():
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    model = nn.ModuleList([nn.Sequential(copy.deepcopy(linear), nn.Linear(48, 48))])
    compact_linear_layers(model, targets=[r"0\.0"])
    optimizer = build_optimizer(model, targets=[r"0\.0"], **OPTIONS)
    bind_compact(model, optimizer)
    x = torch.randn(5, 7, 64, requires_grad=True)
    tokens_count = 5 * 7
    assert saved_activation_bytes(linear, x) == tokens_count * 64 * 4  # x itself
    assert saved_activation_bytes(model[0][0], x) == tokens_count * RANK * 4  # z = x Q


class RecordingOptimizer:
    """What a CompactLinear asks of its optimizer: the basis Q of the next step, and a place for R."""

    def __init__(self, basis: torch.Tensor) -> None:
        self.basis, self.received = basis, {}

    def upcoming_bases(self, weight):
        return None, self.basis

    def receive(self, weight, low, accumulate=False):
        self.received[weight] = low


BF16_ROUNDOFF = 2.0 ** -8


def relative_error(mine: torch.Tensor, want: torch.Tensor) -> float:
    return ((mine - want).norm() / want.norm()).item()


def test_under_autocast_a_compact_layer_computes_as_nn_linear_and_gives_r_in_the_weights_dtype():
    """bf16 autocast: the output and the input and bias gradients of nn.Linear under the same
    autocast; R is the projection of nn.Linear's weight gradient up to bf16 rounding, in float32."""
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    layer = CompactLinear.from_linear(copy.deepcopy(linear))
    basis = torch.randn(64, RANK) / RANK ** 0.5
    layer._optimizer = RecordingOptimizer(basis)
    x, direction = torch.randn(5, 7, 64), torch.randn(5, 7, 48)
    results = []
    for module in (linear, layer):
        inputs = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = module(inputs)
        (out.float() * direction).sum().backward()
        results.append((out, inputs.grad))
    (want_out, want_grad), (out, grad) = results
    assert out.dtype == want_out.dtype == torch.bfloat16 and torch.equal(out, want_out)
    assert torch.equal(grad, want_grad)
    torch.testing.assert_close(layer.bias.grad, linear.bias.grad)
    low = layer._optimizer.received[layer.weight]
    assert low.dtype == torch.float32
    assert relative_error(low, linear.weight.grad @ basis) < 4 * BF16_ROUNDOFF


def train_under_autocast(model, optimizer, steps: range) -> None:
    for step in steps:
        batch = tokens(step)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def test_under_autocast_compact_layers_train_like_galore_up_to_bf16_rounding():
    reference = small_llama()
    reference_optimizer = build_optimizer(reference, **OPTIONS, inner="sgd")
    model, optimizer = compact_llama(inner="sgd")
    train_under_autocast(reference, reference_optimizer, range(3))
    train_under_autocast(model, optimizer, range(3))
    for (name, mine), want, start in zip(model.named_parameters(), reference.parameters(), small_llama().parameters()):
        assert relative_error(mine - start, want - start) < 4 * BF16_ROUNDOFF, name


@pytest.mark.slow
def test_precision_bf16_mixed_trains_compact_layers_like_the_uncompressed_projection(tmp_path):
    """``precision: bf16-mixed`` through LowRankModule and a Trainer: the updates of the run without
    compression on the same random right projection, up to bf16 rounding."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from lit_lowrank.lightning import LowRankConfig, LowRankModule

    def fit(compact: bool) -> LowRankModule:
        config = LowRankConfig(projector="random", side="right", rank=RANK, update_gap=GAP, lr=1e-2, warmup=0,
                               inner="sgd", compact=compact)
        module = LowRankModule(small_llama(), lowrank=config)
        trainer = pl.Trainer(max_steps=3, accelerator="cpu", precision="bf16-mixed", logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             default_root_dir=tmp_path)
        trainer.fit(module, DataLoader([{"input_ids": tokens(step)[0]} for step in range(6)], batch_size=2))
        return module

    compact, plain = fit(True), fit(False)
    assert sum(isinstance(m, CompactLinear) for m in compact.modules()) == 14
    start = small_llama()
    for (name, mine), want in zip(compact.network.named_parameters(), plain.network.parameters()):
        delta = want - start.get_parameter(name)
        assert delta.norm() > 0 and relative_error(mine - start.get_parameter(name), delta) < 4 * BF16_ROUNDOFF, name


def test_a_compact_run_resumes_bitwise():
    model, optimizer = compact_llama()
    train(model, optimizer, range(3))
    saved_model, saved_optimizer = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())
    train(model, optimizer, range(3, 6))
    resumed, resumed_optimizer = compact_llama()
    resumed.load_state_dict(saved_model)
    resumed_optimizer.load_state_dict(saved_optimizer)
    train(resumed, resumed_optimizer, range(3, 6))
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_eval_and_no_grad_are_plain_linear_layers():
    model, _ = compact_llama()
    model.eval()
    batch = tokens(0)
    plain = small_llama().eval()
    torch.testing.assert_close(model(batch).logits, plain(batch).logits, rtol=0, atol=0)


@pytest.mark.parametrize("options, message", [
    ({"projector": "svd"}, "fits its basis to the gradient"),
    ({"side": "std"}, "set side: right"),
    ({"rule": "fira"}, "reads the full gradient"),
])
def test_what_cannot_compute_r_from_compressed_activations_is_refused(options, message):
    model = small_llama()
    compact_linear_layers(model)
    optimizer = build_optimizer(model, **{**OPTIONS, **options})
    with pytest.raises(ValueError, match=message):
        bind_compact(model, optimizer)


def test_an_unbound_layer_and_layerwise_mode_are_refused():
    model = small_llama()
    compact_linear_layers(model)
    batch = tokens(0)
    with pytest.raises(RuntimeError, match="bind_compact"):
        model(batch, labels=batch)
    optimizer = build_optimizer(model, **OPTIONS)
    with pytest.raises(ValueError, match="layer-wise hooks would never step them"):
        LayerwiseUpdates(optimizer).attach()


def test_only_nn_linear_targets_are_compressed():
    model = nn.ModuleList([nn.Sequential(nn.Conv1d(4, 4, 1), nn.ReLU()) for _ in range(2)])
    with pytest.raises(ValueError, match="nn.Linear layers only"):
        compact_linear_layers(model, targets=["0"])
    assert isinstance(CompactLinear.from_linear(nn.Linear(3, 2)), CompactLinear)


@pytest.mark.slow
def test_the_lightning_config_compresses_and_equals_the_uncompressed_random_projection(tmp_path):
    """``lowrank.compact: true`` through LowRankModule and a Trainer: the same weights as the
    run without compression on the same random right projection."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from lit_lowrank.lightning import LowRankConfig, LowRankModule

    def fit(compact: bool) -> LowRankModule:
        config = LowRankConfig(projector="random", side="right", rank=RANK, update_gap=GAP, lr=1e-2, warmup=0,
                               inner="sgd", compact=compact)
        module = LowRankModule(small_llama(), lowrank=config)
        trainer = pl.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
        trainer.fit(module, DataLoader([{"input_ids": tokens(step)[0]} for step in range(8)], batch_size=2))
        return module

    compact, plain = fit(True), fit(False)
    assert sum(isinstance(m, CompactLinear) for m in compact.modules()) == 14
    start = small_llama()
    for (name, mine), want in zip(compact.network.named_parameters(), plain.network.parameters()):
        assert not torch.equal(mine, start.get_parameter(name)), name
        torch.testing.assert_close(mine, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fields, message", [
    ({"projector": "svd"}, "fits its basis to the gradient"),
    ({"layerwise": True}, "layerwise: false"),
    ({"method": "fira"}, "reads the full gradient"),
])
def test_config_refuses_compact_options_it_cannot_honour_when_parsed(fields, message):
    from lit_lowrank.lightning import LowRankConfig

    with pytest.raises(ValueError, match=message):
        LowRankConfig(**{"projector": "random", "side": "right", "compact": True, **fields})


@pytest.mark.slow
def test_a_users_module_adopts_compact_through_the_callback_and_clipping_is_refused():
    import lightning.pytorch as pl
    from lightning.pytorch.demos.boring_classes import BoringModel
    from torch.utils.data import DataLoader

    from lit_lowrank.lightning import LowRankCallback

    class Blocks(BoringModel):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.ModuleList([nn.Sequential(nn.Linear(32, 32), nn.Tanh()) for _ in range(2)])
            self.head = nn.Linear(32, 2)

        def forward(self, x):
            for block in self.layer:
                x = block(x)
            return self.head(x)

    def fit(**trainer_options):
        model = Blocks()
        start = model.layer[0][0].weight.detach().clone()
        callback = LowRankCallback(compact=True, projector="random", side="right", rank=4)
        trainer = pl.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, callbacks=[callback],
                             **trainer_options)
        trainer.fit(model, DataLoader(torch.randn(32, 32), batch_size=8))
        return model, start

    model, start = fit()
    assert isinstance(model.layer[0][0], CompactLinear) and not torch.equal(model.layer[0][0].weight, start)
    with pytest.raises(ValueError, match="no gradients to clip.*gradient_clip_val=None, or no 'compact' in lowrank"):
        fit(gradient_clip_val=1.0)
