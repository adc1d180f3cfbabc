"""Options are validated when the optimizer is built (not at the first step), components are
probed with their arguments, and what plugin components return is checked, naming the plugin."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lit_lowrank import DenseBasisProjector, LowRankOptimizer, Quantizer, Side, UnknownComponentError, hookimpl
from lit_lowrank.optim.validation import check_group
from lit_lowrank.quantizers.bnb import BnbBlockwise8bit
from lit_lowrank.quantizers.int import IntQuantizer


def lowrank_group(weight: torch.Tensor | None = None) -> list[dict]:
    weight = torch.zeros(16, 8, requires_grad=True) if weight is None else weight
    return [{"params": [weight], "lowrank": True}]


def step_once(optimizer: LowRankOptimizer, weight: torch.Tensor, seed: int = 0) -> None:
    weight.grad = torch.randn(weight.shape, generator=torch.Generator().manual_seed(seed))
    optimizer.step()


BAD_OPTIONS = [
    ({"betas": (0.9, 1.5)}, ValueError, r"betas must each be in \[0, 1\)"),
    ({"betas": (0.9,)}, TypeError, "betas must be two numbers"),
    ({"lr": math.inf}, ValueError, "lr must be a finite number >= 0"),
    ({"lr": math.nan}, ValueError, "lr must be a finite number >= 0"),
    ({"eps": 0.0}, ValueError, "eps must be a finite number > 0"),
    ({"eps": -1e-8}, ValueError, "eps must be a finite number > 0"),
    ({"weight_decay": -0.1}, ValueError, "weight_decay must be a finite number >= 0"),
    ({"scale": math.nan}, ValueError, r"scale \(α, the update scale\) must be a finite number > 0"),
    ({"scale": -0.25}, ValueError, "scale .* must be a finite number > 0"),
    ({"rank": 0}, ValueError, "rank must be >= 1"),
    ({"rank": 2.5}, TypeError, "rank must be an integer, got 2.5"),
    ({"rank": "8"}, TypeError, "rank must be an integer, got '8'"),
    ({"rank": True}, TypeError, "rank must be an integer, got True"),
    ({"update_gap": 0}, ValueError, "update_gap must be >= 1"),
    ({"update_gap": 1.5}, TypeError, "update_gap must be an integer"),
    ({"side": "sideways"}, ValueError, "side='sideways'; expected one of"),
    ({"projector_args": {"quantiser": "int"}}, TypeError,
     r"projector 'svd' \(from lit_lowrank.projectors.svd\): .*unknown option.*'quantiser'.*accepts: .*quantizer"),
    ({"projector_args": {"quantizer": "int4x"}}, UnknownComponentError,
     r"projector 'svd' .*unknown quantizer 'int4x'. Registered: .*int"),
    ({"projector_args": {"quantizer": "int", "quantizer_args": {"bits": 12}}}, ValueError,
     r"projector 'svd' .*int quantizer takes 2..8 bits, got 12"),
    ({"schedule": "lazy", "schedule_args": {"tresh": 0.5}}, TypeError,
     r"schedule 'lazy' .*'tresh'.*accepts: gap, threshold"),
    ({"inner": "adamw8bit", "inner_args": {"quantizer": "int4x"}}, UnknownComponentError,
     r"inner optimizer 'adamw8bit' .*unknown quantizer 'int4x'"),
]


@pytest.mark.parametrize("options, error, message", BAD_OPTIONS, ids=[str(o) for o, _, _ in BAD_OPTIONS])
def test_bad_options_fail_when_the_optimizer_is_built(options, error, message):
    with pytest.raises(error, match=message):
        LowRankOptimizer(lowrank_group(), **options)


def test_component_args_must_be_a_mapping():
    with pytest.raises(TypeError, match="projector_args must be a mapping of keyword arguments, got"):
        LowRankOptimizer([{**lowrank_group()[0], "projector_args": ["int"]}])


@pytest.mark.parametrize("options, message", [
    ({"lr": math.inf}, "lr must be"), ({"betas": (1.0, 0.999)}, "betas must each be"),
    ({"eps": 0.0}, "eps must be"), ({"weight_decay": -1.0}, "weight_decay must be")])
def test_dense_group_options_are_validated_the_same_way(options, message):
    dense = [{"params": [torch.zeros(4, requires_grad=True)], "lowrank": False, **options}]
    with pytest.raises(ValueError, match=message):
        LowRankOptimizer(dense)


def test_a_bad_option_in_one_param_group_is_refused():
    groups = lowrank_group() + [{"params": [torch.zeros(4, requires_grad=True)], "lowrank": False, "lr": -1.0}]
    with pytest.raises(ValueError, match="lr must be a finite number >= 0, got -1.0"):
        LowRankOptimizer(groups)


def test_inner_and_rule_typos_name_the_component():
    with pytest.raises(TypeError, match=r"inner optimizer 'adamw' \(from lit_lowrank.inner.adamw\): .*'beta3'"):
        LowRankOptimizer(lowrank_group(), inner_args={"beta3": 0.5})
    with pytest.raises(TypeError, match=r"update rule 'fira' .*'gama'.*accepts: scale, gamma"):
        LowRankOptimizer(lowrank_group(), rule="fira", rule_args={"gama": 1.0})


def test_valid_edge_values_are_accepted():
    """The ranges are the documented ones, not narrower: lr 0, betas 0, a numpy/tensor lr."""
    import numpy as np

    for options in ({"lr": 0.0, "betas": (0.0, 0.0), "weight_decay": 0.0}, {"lr": np.float32(1e-3)},
                    {"lr": torch.tensor(1e-3)}, {"rank": np.int64(4), "update_gap": 1}):
        LowRankOptimizer(lowrank_group(), **options)
    check_group({"lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0, "lowrank": False})


# ---------------------------------------------------------------- plugin components' outputs
class _ExtraColumnProjector(DenseBasisProjector):
    """Returns the top-r singular vectors plus one zero column: rank r + 1."""

    def fit(self, grad, side):
        _, _, vh = torch.linalg.svd(grad, full_matrices=False)
        return None, torch.cat([vh[: self.rank].T, torch.zeros(grad.shape[1], 1)], dim=1)


class _TransposedProjector(DenseBasisProjector):
    """Returns Qᵀ (r×n) instead of Q (n×r)."""

    def fit(self, grad, side):
        _, _, vh = torch.linalg.svd(grad, full_matrices=False)
        return None, vh[: self.rank]


class _QRProjector(DenseBasisProjector):
    """Q of the QR of Gᵀ: an orthonormal basis of G's row space (not the top-r one)."""

    def fit(self, grad, side):
        return None, torch.linalg.qr(grad.T)[0][:, : self.rank]


class _NaNQuantizer(IntQuantizer):
    def dequantize(self, packed):
        return super().dequantize(packed) * math.nan


class _ScrambledQuantizer(IntQuantizer):
    """Right values, wrong layout: the round trip comes back flattened."""

    def dequantize(self, packed):
        return super().dequantize(packed).flatten()


class _BlownUpQuantizer(IntQuantizer):
    """Loses track of the scale: x̂ = 4·x."""

    def dequantize(self, packed):
        return super().dequantize(packed) * 4


class _NaNMomentQuantizer(BnbBlockwise8bit):
    def dequantize(self, packed):
        return super().dequantize(packed) * math.nan


class _BrokenPlugin:
    @hookimpl
    def register_projectors(self, register):
        register("wide", _ExtraColumnProjector)
        register("transposed", _TransposedProjector)
        register("qr", _QRProjector)

    @hookimpl
    def register_quantizers(self, register):
        register("nanq", _NaNQuantizer)
        register("flatq", _ScrambledQuantizer)
        register("bigq", _BlownUpQuantizer)
        register("nan-8bit", _NaNMomentQuantizer)


@pytest.fixture
def broken_plugin(fresh_plugins):
    fresh_plugins.register_plugin(_BrokenPlugin(), name="lit-lowrank-broken")
    yield fresh_plugins
    fresh_plugins.unregister_plugin("lit-lowrank-broken")


def test_a_basis_with_one_column_too_many_is_refused_naming_the_plugin(broken_plugin):
    weight = torch.zeros(16, 8, requires_grad=True)
    optimizer = LowRankOptimizer(lowrank_group(weight), rank=4, projector="wide")
    with pytest.raises(RuntimeError, match=r"projector 'wide' \(from lit-lowrank-broken\) returned a \(8, 5\) "
                                           r"tensor as its basis Q for a 16×8 gradient .*rank 4"):
        step_once(optimizer, weight)
    assert torch.equal(weight, torch.zeros(16, 8))  # refused before any update


def test_a_basis_above_a_clamped_rank_is_refused(broken_plugin):
    """rank 32 is clamped to min(16, 8) = 8 for this weight; 9 columns cannot be right."""
    weight = torch.zeros(16, 8, requires_grad=True)
    optimizer = LowRankOptimizer(lowrank_group(weight), rank=32, projector="wide")
    with pytest.warns(UserWarning, match="clamped"), pytest.raises(RuntimeError, match=r"\(8, 9\) tensor"):
        step_once(optimizer, weight)


def test_a_transposed_basis_is_refused_naming_the_plugin(broken_plugin):
    weight = torch.zeros(16, 8, requires_grad=True)
    optimizer = LowRankOptimizer(lowrank_group(weight), rank=4, projector="transposed")
    with pytest.raises(RuntimeError, match=r"projector 'transposed' \(from lit-lowrank-broken\) returned a \(4, 8\)"):
        step_once(optimizer, weight)


def test_nan_bases_from_a_nan_gradient_blame_the_gradient(broken_plugin):
    """A QR projector returns NaN bases for a NaN gradient that `nonfinite: ignore` let through:
    the message says the gradient is the problem, not the projector."""
    weight = torch.zeros(16, 8, requires_grad=True)
    optimizer = LowRankOptimizer(lowrank_group(weight), rank=4, projector="qr", nonfinite="ignore")
    weight.grad = torch.full((16, 8), math.nan)
    with pytest.raises(RuntimeError, match="a subspace refresh got a gradient with NaN or inf values"):
        optimizer.step()
    assert torch.equal(weight, torch.zeros(16, 8))


@pytest.mark.parametrize("name, problem", [
    ("nanq", "the round trip of a finite tensor has NaN or infinite values"),
    ("flatq", r"a \(8, 32\) tensor came back as \(256,\)"), ("bigq", r"it errs by up to .*, beyond 2·max\|x\| = .* \(its values leave the data's range\)")])
def test_a_broken_basis_quantizer_fails_when_the_optimizer_is_built(broken_plugin, name, problem):
    with pytest.raises(ValueError, match=rf"quantizer '{name}' \(from lit-lowrank-broken\) fails its round-trip "
                                         rf"probe: {problem}; fix or uninstall that plugin, or set another quantizer"):
        LowRankOptimizer(lowrank_group(), rank=4, projector_args={"quantizer": name})


def test_a_broken_moment_quantizer_fails_when_the_optimizer_is_built(broken_plugin):
    with pytest.raises(ValueError, match=r"quantizer 'nan-8bit' \(from lit-lowrank-broken\) fails its round-trip probe"):
        LowRankOptimizer(lowrank_group(), rank=4, inner="adamw8bit", inner_args={"quantizer": "nan-8bit"})


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_working_quantizers_pass_the_probe(bits, rounding, symmetric):
    from lit_lowrank.quantizers.base import probe_round_trip

    quantizer = IntQuantizer(bits=bits, rounding=rounding, symmetric=symmetric)
    assert probe_round_trip(quantizer, "int") is quantizer
    assert isinstance(quantizer, Quantizer)


def test_a_kwargs_plugin_typo_lists_the_base_class_options(fresh_plugins):
    class Forwarding(DenseBasisProjector):
        def __init__(self, rank, *, oversample=8, **kwargs):
            super().__init__(rank, **kwargs)

        def fit(self, grad, side):
            raise NotImplementedError

    class Plugin:
        @hookimpl
        def register_projectors(self, register):
            register("forwarding", Forwarding)

    fresh_plugins.register_plugin(Plugin(), name="fwd")
    with pytest.raises(TypeError, match=r"projector 'forwarding' \(from fwd\).*'oversampel'.*accepts: "
                                        r"rank, oversample, side, seed, quantizer, quantizer_args"):
        LowRankOptimizer(lowrank_group(), projector="forwarding", projector_args={"oversampel": 4})


def test_build_optimizer_validates_before_the_first_step():
    model = nn.Sequential()
    model.add_module("mlp", nn.Linear(8, 16))
    from lit_lowrank import build_optimizer

    with pytest.raises(ValueError, match="betas must each be in"):
        build_optimizer(model, targets=["mlp"], betas=(0.9, 1.5))
