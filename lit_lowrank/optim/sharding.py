"""Weights sharded by rows across ranks: FSDP2's ``fully_shard`` (a DTensor placed ``Shard(0)`` on
a 1-D device mesh), as Lightning's ``ModelParallelStrategy`` applies it, or HSDP (``fully_shard``
over a 2-D mesh: replicas of the row shards, ``(Replicate(), Shard(0))``).

Rank i holds rows I_i of a weight W (m×n) and of its gradient G, which FSDP reduce-scattered.
A low-rank step needs (README 'Scaling out'):

* refresh — the basis of the *whole* G: one all-gather of G, on refresh steps only; every rank
  fits the same basis from the same numbers, as under DDP (a projector that draws its basis from
  a seed and G's shape, ``random``, gathers nothing); with refresh sharing
  (:mod:`~lit_lowrank.optim.refresh_sharing`) G is gathered on the one rank that fits the basis
  (:meth:`RowShard.gather_to`), which sends it to the others;
* a right projection ``R = G Q`` (m×r): rows I_i of R are ``G_i Q``, computed locally, and the
  moments are split by rows like W;
* a left projection ``R = Lᵀ G = Σ_i L_iᵀ G_i`` (r×n; both sides, ``Lᵀ G Q``: r×r): one
  all-reduce of R; each rank's moments cover one block J_i of R's columns and the direction ``N`` is
  all-gathered from the blocks;
* the lift is local: rows I_i of ``L N`` are ``L_i N``, of ``N Qᵀ`` are ``N_i Qᵀ``;
* a norm over a split tensor (Fira's and APOLLO's limiter, APOLLO-Mini's tensor-wise scaling):
  an all-reduce of the ranks' squared partial norms.

Each rank keeps its part of the state as plain tensors; :meth:`RowShard.distributed` hands a
part out as a DTensor, so that torch's distributed checkpoint saves each rank's part and
assembles full state dicts. The optimizer reaches all of this through a weight's placement,
:class:`~lit_lowrank.optim.placement.RowsOfWeight`, which wraps its :class:`RowShard`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn


from lit_lowrank.targets import repeated_blocks
from lit_lowrank.projectors.base import Projector, Side

try:
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:
    try:  # torch 2.4 keeps DTensor private
        from torch.distributed._tensor import DTensor, Replicate, Shard
        from torch.distributed.device_mesh import DeviceMesh
    except ImportError:  # torch built without distributed
        DTensor = DeviceMesh = Replicate = Shard = None


def is_sharded(p: Tensor) -> bool:
    """Whether ``p`` is a DTensor (FSDP2, tensor parallelism) or an FSDP1 flat parameter."""
    return (DTensor is not None and isinstance(p, DTensor)) or bool(
        getattr(p, "_is_flat_param", False) or getattr(p, "_fsdp_flattened", False))


def local(t: Tensor | None) -> Tensor | None:
    """This rank's part of ``t`` (a DTensor's local tensor, sharing its storage), or ``t`` itself."""
    return t.to_local() if DTensor is not None and isinstance(t, DTensor) else t


def chunk_bounds(size: int, parts: int, index: int) -> slice:
    """Part ``index`` of ``range(size)`` cut into ``parts`` as ``torch.chunk`` cuts it (FSDP2's and
    DTensor ``Shard``'s rule): blocks of ``ceil(size / parts)``, the last ones shorter or empty."""
    block = math.ceil(size / parts)
    start = min(index * block, size)
    return slice(start, min(start + block, size))


@dataclass
class RowShard:
    """How this rank holds a row-sharded parameter: its ``mesh``, the full ``shape``, and which
    mesh dimension splits the rows (``shard_dim``; HSDP replicates the shards along the other).
    The collectives run over the ranks of that dimension only: replicas hold the same numbers.
    ``sent`` counts their bytes: a tensor all-reduced, or the whole tensor an all-gather assembles."""

    mesh: DeviceMesh
    shape: torch.Size
    shard_dim: int = 0
    sent: int = 0

    @classmethod
    def of(cls, p: Tensor) -> RowShard | None:
        """None for a parameter this rank holds whole; raises for a sharding other than FSDP2's
        rows (``Shard(0)`` on a 1-D mesh, or HSDP's ``(Replicate(), Shard(0))``): FSDP1's flat
        parameters, tensor parallelism."""
        if not is_sharded(p):
            return None
        if DTensor is None or not isinstance(p, DTensor):
            raise ValueError(
                f"a parameter of shape {tuple(p.shape)} is an FSDP1 flat parameter: FSDP1 flattens the weights and "
                "cuts the flat vector anywhere, so no rank holds whole rows of a gradient. Shard with FSDP2 "
                "instead: Lightning's ModelParallelStrategy with fully_shard in configure_model (strategy "
                "'fsdp_lowrank' does it for you), or torch.distributed.fsdp.fully_shard; see README 'Scaling out'.")
        placements = tuple(p.placements)
        if placements not in ((Shard(0),), (Replicate(), Shard(0))):
            raise ValueError(
                f"a parameter of shape {tuple(p.shape)} is placed {placements} on a {p.device_mesh.ndim}-D mesh; the "
                "low-rank optimizer takes weights whole on every rank or split by rows (FSDP2's fully_shard over a "
                "1-D mesh, or HSDP over a 2-D one). Tensor parallelism is not supported: shard with "
                "fully_shard(module, mesh=device_mesh['data_parallel']).")
        return cls(p.device_mesh, p.shape, len(placements) - 1)

    @property
    def group(self) -> dist.ProcessGroup:
        return self.mesh.get_group(self.shard_dim)

    def _block(self, size: int) -> slice:
        return chunk_bounds(size, self.mesh.size(self.shard_dim), self.mesh.get_local_rank(self.shard_dim))

    def _placements(self, dim: int) -> list:
        """The parameter's placements with its row split moved to tensor axis ``dim``."""
        return [Replicate()] * self.shard_dim + [Shard(dim)]

    @property
    def rows(self) -> slice:
        """This rank's rows I_i of the full weight."""
        return self._block(self.shape[0])

    def columns(self, n: int) -> slice:
        """This rank's block J_i of the columns of an r×n projected gradient."""
        return self._block(n)

    def total(self, partial: Tensor) -> Tensor:
        """The sum over the ranks of ``partial`` (a squared norm of this rank's part, ``L_iᵀ G_i``)."""
        dist.all_reduce(partial, group=self.group)
        self.sent += partial.numel() * partial.element_size()
        return partial

    def least(self, value: int) -> int:
        """The smallest of the ranks' ``value``s (the first offending tensor any rank found)."""
        found = torch.tensor(value)
        dist.all_reduce(found, op=dist.ReduceOp.MIN, group=self.group)
        self.sent += found.element_size()
        return int(found)

    def gather(self, part: Tensor, dim: int, size: int) -> Tensor:
        """The whole tensor whose blocks along ``dim`` (of ``size`` in all) the ranks hold."""
        whole = self.distributed(part, dim, size).full_tensor()
        self.sent += whole.numel() * whole.element_size()
        return whole

    def gather_to(self, part: Tensor, size: int, owner: int) -> Tensor | None:
        """The whole tensor whose row blocks (``size`` rows in all) the ranks hold, on global rank
        ``owner`` only, None elsewhere: one ``gather`` to the rank that refreshes the weight
        instead of an all-gather to all (refresh sharing). Ranks outside ``owner``'s group along
        the split (another HSDP replica) take no part."""
        ranks = dist.get_process_group_ranks(self.group)
        if owner not in ranks:
            return None
        block = math.ceil(size / len(ranks))
        padded = part.new_zeros((block, *part.shape[1:]))  # gather takes blocks of one shape
        padded[:part.shape[0]] = part
        receiving = dist.get_rank() == owner
        blocks = [torch.empty_like(padded) for _ in ranks] if receiving else None
        dist.gather(padded, blocks, dst=owner, group=self.group)
        self.sent += padded.numel() * padded.element_size()
        if not receiving:
            return None
        return torch.cat([piece[:len(range(size)[chunk_bounds(size, len(ranks), index)])]
                          for index, piece in enumerate(blocks)])

    def distributed(self, part: Tensor, dim: int, size: int) -> DTensor:
        """``part`` (this rank's block along ``dim``) as a DTensor ``Shard(dim)`` of the whole."""
        dim %= part.ndim
        shape = list(part.shape)
        shape[dim] = size
        stride = torch.empty(shape, device="meta").stride()
        return DTensor.from_local(part, self.mesh, self._placements(dim), run_check=False, shape=torch.Size(shape),
                                  stride=stride)

    def localize(self, value: Tensor, dim: int, size: int) -> Tensor:
        """This rank's block along ``dim`` of saved state: a DTensor of the whole (as torch's
        distributed checkpoint loads it, with any placement), or a plain tensor of the whole."""
        dim %= max(value.ndim, 1)
        if DTensor is not None and isinstance(value, DTensor):
            if value.shape[dim] != size:
                return value  # the caller's shape check names the mismatch
            return value.redistribute(self.mesh, self._placements(dim)).to_local()
        if value.ndim == 0 or value.shape[dim] != size:
            return value
        return value.narrow(dim, (block := self._block(size)).start, block.stop - block.start)


class LocalRows:
    """A projector as one rank of a row-sharded weight applies it: the bases of the whole
    gradient, with the left basis L (m×r) cut to this rank's rows L_i — or, for a stack of
    experts split by experts (``stacked``), each per-expert basis (E×d×r) cut to this rank's
    experts (a basis shared by the stack stays whole).

    ``project`` gives R's rows ``G_i Q`` (right), the whole ``Σ_i L_iᵀ G_i`` (left, both: an
    all-reduce) or this rank's experts' R (local); ``project_back``/``add_back_`` give this rank's
    part of the lift. Used only for projectors that apply their bases as
    :class:`~lit_lowrank.projectors.base.Projector` does.
    """

    def __init__(self, projector: Projector, shard: RowShard, stacked: bool = False) -> None:
        self.projector, self.shard, self.stacked = projector, shard, stacked

    @property
    def side(self) -> Side:
        return self.projector.side

    @property
    def low_split(self) -> bool:
        """Whether R (and N) are split over the ranks like G (experts, a right projection) or
        whole on every rank."""
        return self.stacked or self.side == Side.RIGHT

    def bases(self) -> tuple[Tensor | None, Tensor | None]:
        left, right = self.projector.bases()
        if self.stacked:
            return tuple(b if b is None or b.ndim == 2 else b[self.shard.rows] for b in (left, right))
        return None if left is None else left[self.shard.rows], right

    def project(self, grad: Tensor) -> Tensor:
        low = Projector.project(self, grad)  # type: ignore[arg-type]
        return low if self.low_split else self.shard.total(low)

    project_back = Projector.project_back
    add_back_ = Projector.add_back_


def applies_bases_plainly(projector: type[Projector]) -> bool:
    """Whether a projector class projects and lifts with its bases as the base class does (so
    :class:`LocalRows` reproduces it on a rank's rows)."""
    return not projector.projects_tensors and all(
        getattr(projector, name) is getattr(Projector, name) for name in ("project", "project_back", "add_back_"))


def map_tensors(tree: Any, fn) -> Any:
    """``fn`` applied to every non-scalar tensor of a (nested) dict of state."""
    if isinstance(tree, dict):
        return {key: map_tensors(value, fn) for key, value in tree.items()}
    if isinstance(tree, Tensor) and tree.ndim > 0:
        return fn(tree)
    return tree


def shard_blocks(network: nn.Module, mesh: DeviceMesh | None = None) -> nn.Module:
    """``fully_shard`` each repeated block of ``network`` (the children of its ``ModuleList``
    containers, e.g. LLaMA's decoder layers: one all-gather per block in forward and backward),
    then the root, which takes the remaining parameters (embeddings, head, final norm), over
    ``mesh`` (default: every rank; a 2-D mesh with named dimensions for HSDP). A no-op for a
    network already sharded. Build the optimizer afterwards: sharding replaces the parameters.
    Under Lightning, call it from ``configure_model`` with ``self.device_mesh["data_parallel"]``
    (:class:`~lit_lowrank.lightning.LowRankModule` does).

    Returns ``network`` (sharded in place)."""
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch < 2.6
        from torch.distributed._composable.fsdp import fully_shard

    if any(is_sharded(p) for p in network.parameters()):
        return network
    blocks = repeated_blocks(network)
    for name, module in network.named_modules():
        if name in blocks and not any(name.startswith(f"{outer}.") for outer in blocks):
            fully_shard(module, mesh=mesh)
    fully_shard(network, mesh=mesh)
    return network
