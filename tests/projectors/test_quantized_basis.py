"""Q-GaLore's INT4 projection basis: a GaLore step with the dequantized basis (written here)
matches the optimizer; storage is packed; state round-trips exactly."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from lit_lowrank import LowRankOptimizer, UnknownComponentError, get_projector
from lit_lowrank.methods import INT4_BASIS
from lit_lowrank.quantizers.int import IntQuantizer
from references import AdamMoments, svd_basis

INT4_CLASS = {**INT4_BASIS, "quantizer": IntQuantizer}  # built directly: a class, as the optimizer hands it


def int4_round_trip(basis: torch.Tensor, group: int = 256) -> torch.Tensor:
    """Min-max 4-bit quantization of the basis vectors (columns of ``basis``, d×r) laid end to
    end, in groups of ``group`` consecutive entries — a group spans two vectors when ``group``
    does not divide d — then back: x̂ = min + s·round((x − min)/s), s = (max−min)/15."""
    vectors = basis.T.contiguous().flatten()
    pad = -vectors.numel() % group
    padded = torch.cat([vectors, vectors[-1:].expand(pad)]).view(-1, group)
    low, high = padded.amin(1, keepdim=True), padded.amax(1, keepdim=True)
    scale = (high - low) / 15
    restored = low + scale * ((padded - low) / scale).round()
    return restored.flatten()[: vectors.numel()].view(basis.shape[1], basis.shape[0]).T


def reference_qgalore(weight, grads, *, rank, gap, scale, lr, betas, eps):
    """GaLore (Alg. 1) whose basis is replaced by its INT4 round trip after each SVD."""
    right = weight.shape[0] >= weight.shape[1]
    adam, trajectory = AdamMoments(betas, eps), []
    for t, grad in enumerate(grads, start=1):
        if (t - 1) % gap == 0:
            basis = int4_round_trip(svd_basis(grad, rank, right)).to(grad.dtype)
        low = grad @ basis if right else basis.T @ grad
        direction = adam.direction(low, t)
        lifted = direction @ basis.T if right else basis @ direction
        weight = weight - lr * scale * lifted
        trajectory.append(weight)
    return trajectory


@pytest.mark.parametrize("shape", [(96, 160), (160, 96)])  # left and right projection
def test_qgalore_step_matches_reference_with_dequantized_basis(shape):
    torch.manual_seed(0)
    options = dict(rank=8, gap=3, scale=0.25, lr=0.01, betas=(0.9, 0.95), eps=1e-8)
    weight = nn.Parameter(torch.randn(*shape, dtype=torch.float64))
    grads = [torch.randn(*shape, dtype=torch.float64) for _ in range(7)]
    expected = reference_qgalore(weight.detach().clone(), grads, **options)
    optimizer = LowRankOptimizer(
        [{"params": [weight], "lowrank": True}], lr=options["lr"], betas=options["betas"], eps=options["eps"],
        rank=options["rank"], update_gap=options["gap"], scale=options["scale"], projector_args=INT4_BASIS,
    )
    plain = torch.linalg.svd(grads[0], full_matrices=False)
    for grad, want in zip(grads, expected):
        weight.grad = grad
        optimizer.step()
        torch.testing.assert_close(weight.detach(), want, rtol=0, atol=1e-5)
    # the INT4 basis really differs from the float one (the comparison above is not vacuous)
    basis = optimizer._slots[weight].projector.bases()
    float_basis = plain[2][:8].T if shape[0] >= shape[1] else plain[0][:, :8]
    assert (basis[0] if basis[0] is not None else basis[1]).sub(float_basis).abs().max() > 1e-3


def test_basis_is_stored_packed():
    torch.manual_seed(0)
    grad = torch.randn(512, 1024)
    plain = get_projector("svd")(rank=32)
    packed = get_projector("svd")(rank=32, **INT4_CLASS)
    for projector in (plain, packed):
        projector.refresh(grad)
    plain_state, packed_state = plain.state_dict(), packed.state_dict()
    assert set(plain_state) == {"side", "refreshes", "left"}  # svd without quantizer is unchanged
    assert plain_state["left"].untyped_storage().nbytes() == 512 * 32 * 4
    assert packed_state["left.codes"].dtype == torch.uint8
    assert packed_state["left.codes"].untyped_storage().nbytes() == 512 * 32 // 2
    groups = 512 * 32 // 256
    assert packed_state["left.scales"].numel() == packed_state["left.mins"].numel() == groups
    # dequantized on use, in the gradient's dtype, within half a step of the float basis
    left, _ = packed.bases()
    assert left.dtype == grad.dtype and left.shape == (512, 32)
    step = packed_state["left.scales"].repeat_interleave(256).view(32, 512).T
    assert ((left - plain.bases()[0]).abs() <= step / 2 + 1e-6).all()


def test_bf16_gradient_gets_bf16_basis():
    projector = get_projector("svd")(rank=4, **INT4_CLASS)
    projector.refresh(torch.randn(64, 32, dtype=torch.bfloat16))
    assert projector.bases()[1].dtype == torch.bfloat16
    assert projector.project(torch.randn(64, 32, dtype=torch.bfloat16)).shape == (64, 4)


def test_state_round_trip_resumes_exactly():
    torch.manual_seed(0)
    weight = nn.Parameter(torch.randn(64, 48))
    grads = [torch.randn(64, 48) for _ in range(8)]

    def make(param):
        return LowRankOptimizer([{"params": [param], "lowrank": True}], rank=6, update_gap=3,
                                schedule="lazy", projector_args=INT4_BASIS)

    optimizer = make(weight)
    for grad in grads[:4]:
        weight.grad = grad
        optimizer.step()
    buffer = io.BytesIO()
    torch.save({"weight": weight.detach().clone(), "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    resumed_weight = nn.Parameter(saved["weight"])
    resumed = make(resumed_weight)
    resumed.load_state_dict(saved["optimizer"])
    for grad in grads[4:]:
        for param, opt in ((weight, optimizer), (resumed_weight, resumed)):
            param.grad = grad
            opt.step()
        assert torch.equal(weight, resumed_weight)


def test_bad_options_name_the_fix():
    with pytest.raises(ValueError, match="without a quantizer"):
        get_projector("svd")(rank=4, quantizer_args={"bits": 4})
    with pytest.raises(UnknownComponentError, match="Registered: .*int"):
        LowRankOptimizer([{"params": [nn.Parameter(torch.zeros(8, 8))], "lowrank": True}],
                         projector_args={"quantizer": "int3"})
