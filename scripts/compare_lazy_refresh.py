"""Fixed-gap GaLore vs Q-GaLore's lazy, layer-adaptive refresh at the same rank: SVDs taken and
final loss, every method from the same initial weights on the same batches.

    python scripts/compare_lazy_refresh.py                          # teacher-student MLP
    python scripts/compare_lazy_refresh.py --task llama --steps 600 # tiny LLaMA, bigram language
    python scripts/compare_lazy_refresh.py --int8-weights           # adds Q-GaLore with INT8 weights

Tasks:

* ``mlp`` — a 3-hidden-layer tanh MLP regressing a fixed random teacher of the same shape on
  anisotropic Gaussian inputs (a few dominant input directions, as real features have), fresh
  samples every step. The gradients' leading directions settle as the student locks onto the
  dominant input and teacher directions — the regime where the lazy schedule saves SVDs.
* ``llama`` — a tiny LLaMA on a seeded sparse bigram language (loss floor: its entropy rate,
  printed). With 1k-token batches the model reaches the floor early and the minibatch
  gradients' leading directions are then mostly noise, so few layers settle.

The final loss is the mean loss on held-out batches after training.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lit_lowrank import build_optimizer
from lit_lowrank.models.llama import Llama
from lit_lowrank.transforms.int_weights import quantize_linear_weights

INT4_BASIS = {"quantizer": "int", "quantizer_args": {"bits": 4, "group_size": 256}}


class TeacherStudent:
    """MLP regression: ``y = teacher(x)``, ``x ~ N(0, Σ)`` with Σ's spectrum decaying as 1/k."""

    targets = ["layers"]

    def __init__(self, args: argparse.Namespace) -> None:
        self.width, self.depth, self.inputs, self.outputs = 256, 3, 128, 64
        generator = torch.Generator().manual_seed(args.seed + 1)
        self.teacher = self.build(generator)
        basis, _ = torch.linalg.qr(torch.randn(self.inputs, self.inputs, generator=generator))
        self.mixing = basis * torch.arange(1, self.inputs + 1).rsqrt()  # x = z Dᵀ Bᵀ: Σ = B D² Bᵀ
        self.batch_size = args.batch

    def build(self, generator: torch.Generator | None = None) -> nn.Module:
        sizes = [self.inputs] + [self.width] * self.depth
        layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes, sizes[1:]))
        model = nn.Module()
        model.layers, model.head = layers, nn.Linear(self.width, self.outputs)
        if generator is not None:
            for param in model.parameters():
                param.data = torch.randn(param.shape, generator=generator) / param.shape[-1] ** 0.5
        return model

    def model(self) -> nn.Module:
        return self.build()

    @staticmethod
    def forward(model: nn.Module, x: Tensor) -> Tensor:
        for layer in model.layers:
            x = torch.tanh(layer(x))
        return model.head(x)

    def batch(self, index: int) -> tuple[Tensor, Tensor]:
        generator = torch.Generator().manual_seed(10_000_019 * (index + 1))
        x = torch.randn(self.batch_size, self.inputs, generator=generator) @ self.mixing.T * 4
        with torch.no_grad():
            return x, self.forward(self.teacher, x)

    def loss(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.forward(model, x), y)

    def describe(self) -> str:
        return f"teacher-student tanh MLP {self.inputs}→{self.width}×{self.depth}→{self.outputs}"


class BigramLanguage:
    """Tokens from a fixed random Markov chain: from each token, ``branching`` successors take
    ``mass`` of the probability (Dirichlet-distributed), the rest is spread uniformly."""

    targets = ["self_attn", "mlp"]

    def __init__(self, args: argparse.Namespace, vocab: int = 256, branching: int = 4, mass: float = 0.9) -> None:
        generator = torch.Generator().manual_seed(args.seed)
        probs = torch.full((vocab, vocab), (1 - mass) / vocab)
        for token in range(vocab):
            successors = torch.randperm(vocab, generator=generator)[:branching]
            weights = torch.distributions.Dirichlet(torch.ones(branching)).sample()
            probs[token, successors] += mass * weights
        self.probs = probs / probs.sum(1, keepdim=True)
        self.vocab, self.batch_size, self.length = vocab, args.batch, 64

    def model(self) -> nn.Module:
        return Llama("tiny", vocab_size=self.vocab, max_seq_len=self.length)

    def entropy_rate(self) -> float:
        """H(next | current) under the chain's stationary distribution, in nats: the loss floor."""
        stationary = torch.ones(self.vocab) / self.vocab
        for _ in range(200):
            stationary = stationary @ self.probs
        return float(stationary @ -(self.probs * self.probs.clamp_min(1e-30).log()).sum(1))

    def batch(self, index: int) -> Tensor:
        generator = torch.Generator().manual_seed(10_000_019 * (index + 1))
        tokens = torch.empty(self.batch_size, self.length + 1, dtype=torch.long)
        tokens[:, 0] = torch.randint(0, self.vocab, (self.batch_size,), generator=generator)
        for t in range(self.length):
            tokens[:, t + 1] = torch.multinomial(self.probs[tokens[:, t]], 1, generator=generator).squeeze(1)
        return tokens

    def loss(self, model: nn.Module, tokens: Tensor) -> Tensor:
        logits = model(input_ids=tokens[:, :-1]).logits
        return nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())

    def describe(self) -> str:
        return f"tiny LLaMA, bigram language (loss floor {self.entropy_rate():.4f} nats)"


TASKS = {"mlp": TeacherStudent, "llama": BigramLanguage}


@dataclass
class Result:
    name: str
    svds: int
    per_layer: list[int]
    final_loss: float
    seconds: float


def run(name: str, task, args: argparse.Namespace, batches: list, held_out: list, *, lazy: bool,
        int4_basis: bool, int8_weights: bool) -> Result:
    torch.manual_seed(args.seed)
    model = task.model()
    if int8_weights:
        quantize_linear_weights(model, task.targets)
    optimizer = build_optimizer(
        model, targets=task.targets, lr=args.lr, rank=args.rank, update_gap=args.gap, scale=args.scale,
        schedule="lazy" if lazy else "fixed", projector_args=INT4_BASIS if int4_basis else {},
    )
    start = time.perf_counter()
    for step, batch in enumerate(batches):
        for group in optimizer.param_groups:  # linear warm-up, then cosine to 10% (as in GaLore)
            warm = min(1.0, (step + 1) / args.warmup)
            group["lr"] = args.lr * warm * (0.1 + 0.45 * (1 + math.cos(math.pi * step / len(batches))))
        loss = task.loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    seconds = time.perf_counter() - start
    with torch.no_grad():
        final = sum(task.loss(model, batch).item() for batch in held_out) / len(held_out)
    per_layer = [slot.projector.refreshes for slot in optimizer._slots.values()]
    return Result(name, optimizer.refresh_count, per_layer, final, seconds)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=sorted(TASKS), default="mlp")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--gap", type=int, default=20, help="GaLore's T (the lazy schedule's initial T)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--scale", type=float, default=0.25)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--batch", type=int, default=16, help="sequences (llama) or samples ×16 (mlp)")
    parser.add_argument("--eval-batches", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--int8-weights", action="store_true", help="add a Q-GaLore run with INT8 weights")
    args = parser.parse_args(argv)
    if args.task == "mlp":
        args.batch *= 16

    task = TASKS[args.task](args)
    batches = [task.batch(i) for i in range(args.steps)]
    held_out = [task.batch(args.steps + 1000 + i) for i in range(args.eval_batches)]
    runs = [("galore (fixed gap)", dict(lazy=False, int4_basis=False, int8_weights=False)),
            ("lazy refresh", dict(lazy=True, int4_basis=False, int8_weights=False)),
            ("q-galore (lazy + INT4 basis)", dict(lazy=True, int4_basis=True, int8_weights=False))]
    if args.int8_weights:
        runs.append(("q-galore + INT8 weights", dict(lazy=True, int4_basis=True, int8_weights=True)))
    results = [run(name, task, args, batches, held_out, **options) for name, options in runs]

    base = results[0]
    print(f"{task.describe()}; {args.steps} steps, rank {args.rank}, T={args.gap}, lr {args.lr}")
    print(f"{'method':<30} {'SVDs':>6} {'per layer':>11} {'saved':>7} {'final loss':>11} {'Δloss':>8} {'time s':>7}")
    for r in results:
        print(f"{r.name:<30} {r.svds:>6} {min(r.per_layer):>5}–{max(r.per_layer):<5} {1 - r.svds / base.svds:>7.1%} "
              f"{r.final_loss:>11.4f} {r.final_loss / base.final_loss - 1:>+8.2%} {r.seconds:>7.1f}")


if __name__ == "__main__":
    main()
