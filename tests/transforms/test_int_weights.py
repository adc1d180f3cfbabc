"""QuantizedLinear (Q-GaLore's INT8 weights): exact forward/backward against a float layer holding
the dequantized weight, real storage, the optimizer's weight-store path, stochastic rounding
keeping sub-step updates, training, and exact resume."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from torch import nn

from lit_lowrank import LowRankOptimizer, build_optimizer
from lit_lowrank.quantizers.int import IntQuantizer
from lit_lowrank.transforms.int_weights import QuantizedLinear, quantize_linear_weights
from lit_lowrank.methods import INT4_BASIS


def test_forward_and_backward_match_a_float_layer_with_the_dequantized_weight():
    torch.manual_seed(0)
    layer = QuantizedLinear.from_linear(nn.Linear(64, 32))
    reference = nn.Linear(64, 32)
    reference.weight.data.copy_(layer.dequantized())
    reference.bias.data.copy_(layer.bias.detach())
    x = torch.randn(5, 3, 64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    out, out_ref = layer(x), reference(x_ref)
    torch.testing.assert_close(out, out_ref)
    target = torch.randn_like(out)
    (out * target).sum().backward()
    (out_ref * target).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(layer.weight.grad, reference.weight.grad)
    torch.testing.assert_close(layer.bias.grad, reference.bias.grad)


def test_weight_lives_in_int8():
    linear = nn.Linear(512, 256, bias=False)
    layer = QuantizedLinear.from_linear(linear, bits=8, group_size=256)
    groups = 512 * 256 // 256
    state = layer.state_dict()
    assert "weight" not in state  # no float weight anywhere
    stored = sum(t.untyped_storage().nbytes() for t in state.values())
    assert stored == 512 * 256 + 2 * 4 * groups + 8 * 2 + 8 * 2  # codes, scales+mins, shape, (seed, updates)
    assert layer.weight.untyped_storage().nbytes() == 4  # the gradient carrier has no m×n storage
    assert linear.weight.untyped_storage().nbytes() == 4 * 512 * 256
    error = (layer.dequantized() - linear.weight).abs().flatten()
    assert (error <= layer.weight_scales.repeat_interleave(256) / 2 + 1e-7).all()


def test_optimizer_step_is_the_float_step_then_requantization():
    """One LowRankOptimizer step on the quantized layer = the same step on a float weight equal to
    the dequantized one, followed by (nearest) re-quantization."""
    torch.manual_seed(0)
    layer = QuantizedLinear.from_linear(nn.Linear(48, 40, bias=False), stochastic=False, group_size=64)
    float_weight = nn.Parameter(layer.dequantized())
    grad = torch.randn(40, 48)
    options = dict(lr=0.05, weight_decay=0.1, rank=4)
    for param, extra in ((layer.weight, {}), (float_weight, {})):
        optimizer = LowRankOptimizer([{"params": [param], "lowrank": True, **extra}], **options)
        param.grad = grad.clone()
        optimizer.step()
    expected = IntQuantizer(bits=8, group_size=64).quantize(float_weight.detach())
    for key, tensor in expected.items():
        torch.testing.assert_close(getattr(layer, f"weight_{key}"), tensor)
    assert layer.updates == 1


def interior_mask(weight: torch.Tensor, group: int) -> torch.Tensor:
    """1 except at each group's min and max, so an update there leaves the group's range — and
    thus its scale — unchanged; nearest rounding must then reproduce the old codes exactly."""
    groups = weight.flatten().view(-1, group)
    low, high = groups.aminmax(dim=1, keepdim=True)
    return ((groups > low) & (groups < high)).to(weight.dtype).view_as(weight)


@pytest.mark.parametrize("stochastic", [True, False])
def test_updates_far_below_the_step_survive_only_stochastic_rounding(stochastic):
    torch.manual_seed(0)
    layer = QuantizedLinear.from_linear(nn.Linear(256, 64, bias=False), group_size=256, stochastic=stochastic)
    start, codes = layer.dequantized(), layer.weight_codes.clone()
    step = layer.weight_scales.mean().item()
    delta = step / 100 * interior_mask(start, 256)  # 1% of a quantization step per update
    updates = 20
    for _ in range(updates):
        layer.store_(layer.float_weight() + delta)
    moved = (layer.dequantized() - start)[delta > 0]
    if stochastic:
        # E[moved] = updates·δ; each update adds rounding noise of variance ≤ s²/4 per element
        std_of_mean = step * (updates / 4 / moved.numel()) ** 0.5
        assert abs(moved.mean().item() - updates * step / 100) < 5 * std_of_mean
        assert updates * step / 100 > 8 * std_of_mean  # the signal is clearly resolvable
    else:
        assert torch.equal(layer.weight_codes, codes)  # every update rounded away
        assert moved.abs().max() < step * 1e-3  # (re-derived scales differ by float rounding only)


class TwoLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


def regression_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(step)
    x = torch.randn(32, 32, generator=generator)
    teacher = torch.Generator().manual_seed(1234)
    w = torch.randn(32, 16, generator=teacher) / 32**0.5
    return x, torch.tanh(x @ w)


def train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: range) -> list[float]:
    losses = []
    for step in steps:
        x, y = regression_batch(step)
        loss = nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def make_qgalore(model: nn.Module) -> LowRankOptimizer:
    return build_optimizer(model, targets=["mlp"], lr=0.01, rank=8, update_gap=20, scale=0.25,
                           projector_args=INT4_BASIS,
                           schedule="lazy")


def test_int8_training_reduces_the_loss():
    torch.manual_seed(0)
    model = TwoLayer()
    replaced = quantize_linear_weights(model, ["mlp"])
    assert replaced == ["mlp.0", "mlp.2"] and all(isinstance(model.mlp[i], QuantizedLinear) for i in (0, 2))
    losses = train(model, make_qgalore(model), range(150))
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:10]) / 10


def test_resume_is_exact():
    torch.manual_seed(0)
    model = TwoLayer()
    quantize_linear_weights(model, ["mlp"])
    optimizer = make_qgalore(model)
    train(model, optimizer, range(30))
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    resumed = TwoLayer()
    quantize_linear_weights(resumed, ["mlp"])
    resumed.load_state_dict(saved["model"])
    resumed_optimizer = make_qgalore(resumed)
    resumed_optimizer.load_state_dict(saved["optimizer"])
    assert train(model, optimizer, range(30, 45)) == train(resumed, resumed_optimizer, range(30, 45))
    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_device_and_dtype_moves_keep_the_codes():
    layer = QuantizedLinear.from_linear(nn.Linear(64, 32))
    codes = layer.weight_codes.clone()
    layer.to(torch.bfloat16)
    assert layer.weight.dtype == layer.bias.dtype == torch.bfloat16
    assert layer.weight_scales.dtype == torch.float32 and torch.equal(layer.weight_codes, codes)
    assert layer.weight.untyped_storage().nbytes() == 2
    assert layer(torch.randn(3, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_errors_name_the_fix():
    model = TwoLayer()
    with pytest.raises(ValueError, match="set `targets`"):
        quantize_linear_weights(model, ["attn"])
    quantize_linear_weights(model, ["mlp"])
    with pytest.raises(ValueError, match="low-rank `targets`"):
        build_optimizer(model, targets=["mlp.0"])  # mlp.2 quantized but left dense


def test_layers_draw_distinct_rounding_noise_and_a_resume_draws_the_same():
    """Same weight, same update: layers 0 and 1 must round differently (a CPU torch generator
    seeded with seed·2³² + k keeps only k, so every layer drew the same noise); layer 1 at its
    3rd update rounds like PCG64 seeded with (1, 2) says, also after a state-dict round trip."""
    torch.manual_seed(0)
    linear = nn.Linear(64, 32, bias=False)
    layers = [QuantizedLinear.from_linear(linear, seed=seed) for seed in (0, 1)]
    target = layers[0].float_weight() + 1e-3 * torch.randn(32, 64)  # off the grid
    for layer in layers:
        layer.store_(target)
    assert not torch.equal(layers[0].weight_codes, layers[1].weight_codes)
    layers[1].updates = 2
    resumed = QuantizedLinear(64, 32, bias=False, seed=7)
    resumed.load_state_dict(layers[1].state_dict())
    expected = IntQuantizer(bits=8, group_size=256, rounding="stochastic").quantize(
        target, generator=np.random.default_rng([1, 2]))
    for layer in (layers[1], resumed):
        layer.store_(target)
        assert torch.equal(layer.weight_codes, expected["codes"])


BAD_WEIGHT_OPTIONS = [
    (dict(weight_bits=1), r"bits must be an integer in 2\.\.8"),
    (dict(weight_bits=9), r"bits must be an integer in 2\.\.8"),
    (dict(weight_bits=8.0), r"bits must be an integer in 2\.\.8"),
    (dict(weight_bits=True), r"bits must be an integer in 2\.\.8"),
    (dict(weight_bits=8, weight_args={"groupsize": 64}), r"int-weights has no option\(s\) \['groupsize'\]; its options "
                                                         r"are \['bits', 'group_size', 'stochastic'\]"),
    (dict(weight_bits=8, weight_args={"group_size": 0}), "group_size must be a positive integer .* or -1"),
    (dict(weight_bits=8, weight_args={"group_size": -2}), "group_size must be a positive integer .* or -1"),
    (dict(weight_bits=8, weight_args={"group_size": 64.0}), "group_size must be a positive integer .* or -1"),
    (dict(weight_bits=8, weight_args={"group_size": None}), "group_size must be a positive integer .* or -1"),
    (dict(weight_bits=8, weight_args={"stochastic": "yes"}), "stochastic must be true .* or false"),
    (dict(weight_args={"group_size": 64}), "weight_bits is null; set weight_bits"),
]


@pytest.mark.parametrize("fields, message", BAD_WEIGHT_OPTIONS)
def test_the_config_refuses_bad_weight_options_when_built(fields, message):
    from lit_lowrank.lightning import LowRankConfig

    with pytest.raises(ValueError, match=message):
        LowRankConfig(**fields)


def keyword_cases() -> list[tuple[dict, str]]:
    """The bad options quantize_linear_weights takes as keywords (an unknown one is Python's TypeError)."""
    return [(fields, message) for fields, message in BAD_WEIGHT_OPTIONS
            if "weight_bits" in fields and "groupsize" not in fields.get("weight_args", {})]


@pytest.mark.parametrize("fields, message", keyword_cases())
def test_quantize_linear_weights_refuses_bad_options_before_changing_the_model(fields, message):
    model = TwoLayer()
    with pytest.raises(ValueError, match=message):
        quantize_linear_weights(model, ["mlp"], bits=fields["weight_bits"], **fields.get("weight_args", {}))
    assert not any(isinstance(module, QuantizedLinear) for module in model.modules())


@pytest.mark.parametrize("weight_args", [{}, {"group_size": -1, "stochastic": False}, {"group_size": 1}])
def test_valid_weight_options_are_accepted(weight_args):
    from lit_lowrank.lightning import LowRankConfig

    config = LowRankConfig(weight_bits=4, weight_args=weight_args, targets=["mlp"])
    model = config.prepare(TwoLayer())
    layers = [module for module in model.modules() if isinstance(module, QuantizedLinear)]
    assert layers and all(layer.initial.bits == 4 for layer in layers)
    assert all(layer.initial.group_size == weight_args.get("group_size", 256) for layer in layers)
    assert all(layer.stochastic == weight_args.get("stochastic", True) for layer in layers)
