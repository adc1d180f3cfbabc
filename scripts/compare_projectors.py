"""Refresh cost and subspace quality of each projector on LLaMA-60M's weight shapes.

    python scripts/compare_projectors.py                     # CPU, rank 128, LLaMA-60M gradients
    python scripts/compare_projectors.py --device cuda --repeats 20
    python scripts/compare_projectors.py --gradients synthetic --decay 1.0

For each shape (512×512 attention, 1376×512 gate/up, 512×1376 down) the script takes a real
gradient — one backward pass of a one-block LLaMA-60M (hidden 512, intermediate 1376) on
random tokens — or a synthetic one with singular values (i+1)^−decay, and reports per projector:

* ``ms``: median wall time of one refresh (the SVD, the sketch, the DCT scoring, or one
  online-PCA step);
* ``angle``: the largest principal angle (degrees) between the exact top-r/4 singular
  subspace and its r-dimensional basis — whether the dominant directions are inside it (the
  largest angle to the full top-r subspace says little when σ_r ≈ σ_r+1, as in real gradients);
* ``energy``: ‖Pᵀ G‖² of its basis over that of the exact top-r basis (1 = as good as the SVD).

Timings use ``--threads`` (1 by default: on a shared, loaded CPU, multi-threaded LAPACK calls
are dominated by thread contention and their times mean little).

Projectors are the registered ones (``svd``, ``rsvd`` with q = 1 and 2, ``dct``,
``online-pca`` from an SVD start, ``random``), all on GaLore's ``std`` side.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import Tensor

from lit_lowrank import plugins
from lit_lowrank.models.llama import Llama

SHAPES = {"512x512 (q/k/v/o)": "self_attn.q_proj", "1376x512 (gate/up)": "mlp.up_proj",
          "512x1376 (down)": "mlp.down_proj"}
VARIANTS = {  # label -> (registered projector, keyword arguments)
    "svd": ("svd", {}),
    "rsvd q=1": ("rsvd", {"power_iters": 1}),
    "rsvd q=2": ("rsvd", {"power_iters": 2}),
    "dct": ("dct", {}),
    "online-pca step": ("online-pca", {"init": "svd"}),
    "random": ("random", {"orthonormal": True}),
}


def llama_gradients(device: str) -> dict[str, Tensor]:
    """One backward pass of a one-block LLaMA-60M on random tokens (seeded)."""
    torch.manual_seed(0)
    model = Llama("60m", vocab_size=2048, max_seq_len=256, num_hidden_layers=1).to(device)
    tokens = torch.randint(0, 2048, (4, 256), device=device)
    model(input_ids=tokens, labels=tokens).loss.backward()
    block = model.model.layers[0]
    return {label: block.get_submodule(name).weight.grad.float() for label, name in SHAPES.items()}


def synthetic_gradients(decay: float, device: str) -> dict[str, Tensor]:
    """U diag((i+1)^−decay) Vᵀ with random orthonormal U, V at each shape."""
    generator = torch.Generator().manual_seed(0)
    grads = {}
    for label in SHAPES:
        m, n = (int(d) for d in label.split()[0].split("x"))
        k = min(m, n)
        u, _ = torch.linalg.qr(torch.randn(m, k, generator=generator))
        v, _ = torch.linalg.qr(torch.randn(n, k, generator=generator))
        grads[label] = (u * (torch.arange(1, k + 1) ** -decay) @ v.T).to(device)
    return grads


def basis(projector) -> Tensor:
    left, right = projector.bases()
    return left if left is not None else right


def quality(exact: Tensor, got: Tensor, grad: Tensor) -> tuple[float, float]:
    """(largest principal angle in degrees from the exact top-r/4 subspace to ``got``, captured
    energy relative to the exact basis), in float64."""
    exact, got, grad = exact.double(), got.double(), grad.double()
    cosines = torch.linalg.svdvals(exact[:, : max(1, exact.shape[1] // 4)].T @ got).clamp(max=1.0)
    captured = lambda b: (grad @ b if b.shape[0] == grad.shape[1] else b.T @ grad).square().sum()  # noqa: E731
    return torch.rad2deg(torch.arccos(cosines.min())).item(), (captured(got) / captured(exact)).item()


def timed_refresh(name: str, options: dict, grad: Tensor, rank: int, repeats: int) -> tuple[float, Tensor]:
    """Median ms of a refresh, and the basis after the last one. online-pca is initialised
    first, so what is timed is its per-step update."""
    cls = plugins.get_projector(name)
    times = []
    for _ in range(repeats):
        projector = cls(rank, seed=1, **options)
        if name == "online-pca":
            projector.refresh(grad)
        if grad.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        projector.refresh(grad)
        if grad.is_cuda:
            torch.cuda.synchronize()
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times), basis(projector)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=128, help="GaLore's rank for LLaMA-60M")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--gradients", choices=("llama", "synthetic"), default="llama")
    parser.add_argument("--decay", type=float, default=1.0, help="synthetic spectrum exponent")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    grads = llama_gradients(args.device) if args.gradients == "llama" else synthetic_gradients(args.decay, args.device)
    print(f"rank {args.rank}, {args.gradients} gradients, {args.device} ({torch.get_num_threads()} threads), "
          f"median of {args.repeats}")
    print(f"{'shape':<20} {'projector':<16} {'ms':>8} {'vs svd':>7} {'angle°':>7} {'energy':>7}")
    for label, grad in grads.items():
        svd_ms, exact = timed_refresh("svd", {}, grad, args.rank, args.repeats)
        for variant, (name, options) in VARIANTS.items():
            ms, got = (svd_ms, exact) if name == "svd" else timed_refresh(name, options, grad, args.rank, args.repeats)
            angle, energy = quality(exact, got, grad)
            print(f"{label:<20} {variant:<16} {ms:8.2f} {svd_ms / ms:6.1f}x {angle:7.2f} {energy:7.4f}")


if __name__ == "__main__":
    main()
