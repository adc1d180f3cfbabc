"""Refresh cost and subspace quality of each projector on LLaMA-60M's weight shapes.

    python scripts/compare_projectors.py                     # CPU, rank 128, LLaMA-60M gradients
    python scripts/compare_projectors.py --device cuda --repeats 20
    python scripts/compare_projectors.py --gradients synthetic --decay 1.0
    python scripts/compare_projectors.py --tracking --threads 2 # warm start over a training run

For each shape (512×512 attention, 1376×512 gate/up, 512×1376 down) the script takes a real
gradient — one backward pass of a one-block LLaMA-60M (hidden 512, intermediate 1376) on
random tokens — or a synthetic one with singular values (i+1)^−decay, and reports per projector:

* ``ms``: median wall time of one refresh (the SVD, the sketch, the DCT scoring, one
  online-PCA step, or svd-warm's iterations), and ``best ms`` the fastest (on a loaded machine
  the closest to the work itself);
* ``angle``: the largest principal angle (degrees) between the exact top-r/4 singular
  subspace and its r-dimensional basis — whether the dominant directions are inside it (the
  largest angle to the full top-r subspace says little when σ_r ≈ σ_r+1, as in real gradients);
* ``energy``: ‖Pᵀ G‖² of its basis over that of the exact top-r basis (1 = as good as the SVD).

Timings use ``--threads`` (1 by default: on a shared, loaded CPU, multi-threaded LAPACK calls
are dominated by thread contention and their times mean little); the projectors take turns within
each repeat, so a load that comes and goes falls on all of them alike.

Projectors are the registered ones (``svd``, ``rsvd`` with q = 1 and 2, ``svd-warm`` with 1 and
2 iterations, ``dct``, ``online-pca`` from an SVD start, ``random``), all on GaLore's ``std``
side. The warm-started ones (``svd-warm``, ``online-pca``) are first refreshed on the gradient of
another batch (synthetic: the gradient plus 10 % noise), so what is timed and scored is one
update from there.

``--tracking`` scores the warm start where it matters, over consecutive refreshes of a training
run: a one-block LLaMA-60M (vocabulary: the 256 bytes) trained with ``--method`` (``galore-warm``
by default; rank ``--rank``, ``update_gap`` ``--gap``) on the embedded Shakespeare corpus
(``lit_lowrank/data/corpus.py``), batches of ``--batch`` × ``--seq-len`` bytes. At each of
``--refreshes`` refresh steps the gradients of the three weights are handed to ``svd-warm``
projectors (1 and 2 iterations) that track them from refresh to refresh, and each basis is scored
against the exact SVD of that gradient, beside ``rsvd`` (q = 2, fresh sketch) and the stale
exact basis of the previous refresh (what the weight projects with until the refresh).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import Tensor

from lit_lowrank import build_optimizer, plugins
from lit_lowrank.data.corpus import iter_texts, shakespeare_plays
from lit_lowrank.models.llama import Llama

SHAPES = {"512x512 (q/k/v/o)": "self_attn.q_proj", "1376x512 (gate/up)": "mlp.up_proj",
          "512x1376 (down)": "mlp.down_proj"}
VARIANTS = {  # label -> (registered projector, keyword arguments)
    "svd": ("svd", {}),
    "rsvd q=1": ("rsvd", {"power_iters": 1}),
    "rsvd q=2": ("rsvd", {"power_iters": 2}),
    "svd-warm it=1": ("svd-warm", {"iterations": 1}),
    "svd-warm it=2": ("svd-warm", {"iterations": 2}),
    "dct": ("dct", {}),
    "online-pca step": ("online-pca", {"init": "svd"}),
    "random": ("random", {"orthonormal": True}),
}
WARM_STARTED = ("svd-warm", "online-pca")
"""Projectors whose refresh starts from their previous basis: timed on their second refresh."""
TRACKED = {"svd-warm it=1": {"iterations": 1}, "svd-warm it=2": {"iterations": 2}}


def llama_gradients(device: str) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The gradients of two backward passes (two batches of random tokens, seeded) of one
    one-block LLaMA-60M: the one scored, and the one warm-started projectors start from."""
    torch.manual_seed(0)
    model = Llama("60m", vocab_size=2048, max_seq_len=256, num_hidden_layers=1).to(device)
    batches = []
    for _ in range(2):
        tokens = torch.randint(0, 2048, (4, 256), device=device)
        model.zero_grad()
        model(input_ids=tokens, labels=tokens).loss.backward()
        batches.append(block_gradients(model))
    return batches[0], batches[1]


def block_gradients(model: Llama) -> dict[str, Tensor]:
    """The float32 gradients of the first block's weights of :data:`SHAPES`, copied."""
    block = model.model.layers[0]
    return {label: block.get_submodule(name).weight.grad.float().clone() for label, name in SHAPES.items()}


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


def perturbed(grads: dict[str, Tensor], relative: float = 0.1) -> dict[str, Tensor]:
    """Each gradient plus seeded Gaussian noise of ``relative`` times its Frobenius norm."""
    generator = torch.Generator().manual_seed(1)
    noisy = {}
    for label, grad in grads.items():
        noise = torch.randn(grad.shape, generator=generator).to(grad.device)
        noisy[label] = grad + relative * grad.norm() / noise.norm() * noise
    return noisy


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


def timed_refreshes(grad: Tensor, start: Tensor, rank: int, repeats: int,
                    ) -> dict[str, tuple[float, float, Tensor]]:
    """Per variant of :data:`VARIANTS`: the median and the best ms of a refresh on ``grad``, and
    the basis after the last one. The variants take turns within each repeat, so that load on a shared machine
    falls on all of them alike. A warm-started projector (:data:`WARM_STARTED`) is refreshed on
    ``start`` first, untimed, so what is timed is its update."""
    times: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    bases = {}
    for _ in range(repeats):
        for variant, (name, options) in VARIANTS.items():
            projector = plugins.get_projector(name)(rank, seed=1, **options)
            if name in WARM_STARTED:
                projector.refresh(start)
            times[variant].append(timed(projector.refresh, grad))
            bases[variant] = basis(projector)
    return {variant: (statistics.median(times[variant]), min(times[variant]), bases[variant]) for variant in VARIANTS}


def timed(call, grad: Tensor) -> float:
    """Wall ms of ``call(grad)``, the device synchronized before and after."""
    if grad.is_cuda:
        torch.cuda.synchronize()
    begin = time.perf_counter()
    call(grad)
    if grad.is_cuda:
        torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - begin)


def corpus_bytes() -> Tensor:
    """The embedded corpus as one int64 tensor of UTF-8 byte values (token ids 0–255)."""
    text = "\n".join(iter_texts(shakespeare_plays())).encode("utf-8")
    return torch.frombuffer(bytearray(text), dtype=torch.uint8).long()


def training_refreshes(method: str, rank: int, gap: int, refreshes: int, batch: int, seq_len: int, lr: float,
                       device: str, hidden_size: int | None = None, intermediate_size: int | None = None):
    """Train a one-block LLaMA-60M (or the given sizes) on byte windows of the corpus with
    ``method`` for ``gap · refreshes`` steps; yield ``(step, loss, gradients)`` at each refresh
    step (0, gap, 2·gap, …), the gradients of :data:`SHAPES`' weights as :func:`block_gradients`."""
    torch.manual_seed(0)
    model = Llama("60m", vocab_size=256, max_seq_len=seq_len, hidden_size=hidden_size,
                  intermediate_size=intermediate_size, num_layers=1).to(device)
    optimizer = build_optimizer(model, method=method, rank=rank, update_gap=gap, lr=lr)
    data, generator = corpus_bytes(), torch.Generator().manual_seed(0)
    for step in range(gap * refreshes):
        starts = torch.randint(0, len(data) - seq_len, (batch,), generator=generator)
        tokens = torch.stack([data[start:start + seq_len] for start in starts.tolist()]).to(device)
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        if step % gap == 0:
            yield step, loss.item(), block_gradients(model)
        optimizer.step()
        optimizer.zero_grad()


def tracking_rows(refreshes, rank: int):
    """Score the tracked ``svd-warm`` bases (:data:`TRACKED`), a fresh ``rsvd`` (q = 2) and the
    stale exact basis at each refresh of ``refreshes`` (:func:`training_refreshes`' items);
    yield ``(step, loss, shape label, {variant: (angle°, energy)})``."""
    warm = {}
    stale: dict[str, Tensor] = {}
    for step, loss, grads in refreshes:
        for label, grad in grads.items():
            exact = plugins.get_projector("svd")(rank, seed=1)
            exact.refresh(grad)
            scores = {}
            for variant, options in TRACKED.items():
                if (variant, label) not in warm:
                    warm[variant, label] = plugins.get_projector("svd-warm")(rank, seed=1, **options)
                projector = warm[variant, label]
                projector.refresh(grad)
                scores[variant] = quality(basis(exact), basis(projector), grad)
            sketch = plugins.get_projector("rsvd")(rank, seed=1 + step)
            sketch.refresh(grad)
            scores["rsvd q=2"] = quality(basis(exact), basis(sketch), grad)
            if label in stale:
                scores["stale svd"] = quality(basis(exact), stale[label], grad)
            stale[label] = basis(exact)
            yield step, loss, label, scores


def print_tracking(args: argparse.Namespace) -> None:
    refreshes = training_refreshes(args.method, args.rank, args.gap, args.refreshes, args.batch, args.seq_len, args.lr,
                                   args.device)
    print(f"tracking: one-block LLaMA-60M, {args.method}, rank {args.rank}, gap {args.gap}, "
          f"{args.batch}×{args.seq_len} bytes per step, lr {args.lr}; angle° to the exact top-r/4, energy vs exact")
    variants = [*TRACKED, "rsvd q=2", "stale svd"]
    print(f"{'step':>5} {'loss':>6} {'shape':<20} " + " ".join(f"{v:>16}" for v in variants))
    for step, loss, label, scores in tracking_rows(refreshes, args.rank):
        cells = [f"{scores[v][0]:6.2f}° {scores[v][1]:7.4f}" if v in scores else f"{'—':>16}" for v in variants]
        print(f"{step:5d} {loss:6.3f} {label:<20} " + " ".join(cells))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=128, help="GaLore's rank for LLaMA-60M")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--gradients", choices=("llama", "synthetic"), default="llama")
    parser.add_argument("--decay", type=float, default=1.0, help="synthetic spectrum exponent")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--tracking", action="store_true", help="score svd-warm over a training run's refreshes")
    parser.add_argument("--method", default="galore-warm", help="--tracking: the method trained")
    parser.add_argument("--gap", type=int, default=200, help="--tracking: update_gap T")
    parser.add_argument("--refreshes", type=int, default=5, help="--tracking: refreshes scored")
    parser.add_argument("--batch", type=int, default=4, help="--tracking: sequences per step")
    parser.add_argument("--seq-len", type=int, default=128, help="--tracking: bytes per sequence")
    parser.add_argument("--lr", type=float, default=1e-2, help="--tracking: learning rate")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.tracking:
        print_tracking(args)
        return
    if args.gradients == "llama":
        grads, starts = llama_gradients(args.device)
    else:
        grads = synthetic_gradients(args.decay, args.device)
        starts = perturbed(grads)
    print(f"rank {args.rank}, {args.gradients} gradients, {args.device} ({torch.get_num_threads()} threads), "
          f"median of {args.repeats}")
    print(f"{'shape':<20} {'projector':<16} {'ms':>8} {'best ms':>8} {'vs svd':>7} {'angle°':>7} {'energy':>7}")
    for label, grad in grads.items():
        results = timed_refreshes(grad, starts[label], args.rank, args.repeats)
        svd_ms, _, exact = results["svd"]
        for variant, (ms, best, got) in results.items():
            angle, energy = quality(exact, got, grad)
            print(f"{label:<20} {variant:<16} {ms:8.2f} {best:8.2f} {svd_ms / ms:6.1f}x {angle:7.2f} {energy:7.4f}")


if __name__ == "__main__":
    main()
