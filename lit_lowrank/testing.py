"""Conformance checks for component authors: does a projector, quantizer, update rule, inner
optimizer, schedule or model transform keep the contract the optimizer relies on
(docs/plugins.md)?

Each ``check_<kind>(cls, **options)`` builds ``cls`` as the optimizer would (``options`` are what
a user would write in ``<kind>_args``; a ``quantizer`` may be a registered name or a class),
runs it on odd shapes and dtypes, and raises ``AssertionError`` saying which check broke on which
shape/dtype. They need neither pytest nor Lightning; call them from your plugin's tests::

    from lit_lowrank.testing import check_projector

    def test_my_projector_keeps_the_contract():
        check_projector(MyProjector, oversample=4)

Besides the contract every component keeps, each promise a class makes by its flags is checked
numerically: ``orthonormal`` bases, ``batched`` stacks, ``elementwise`` inner optimizers,
``uses_gradient = False`` rules, and a schedule's cadence against the ``gap`` it takes.

Every check ends with a bitwise-resume run: a small :class:`~lit_lowrank.LowRankOptimizer`
using the component is saved through ``torch.save``/``torch.load(weights_only=True)`` mid-run
and just before a refresh, reloaded into a fresh model and optimizer, and must continue exactly
as the uninterrupted run, having moved every weight it trains.
"""

from __future__ import annotations

import copy
import io
import numbers
import threading
from contextlib import ExitStack, contextmanager
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from lit_lowrank import plugins
from lit_lowrank.hookspecs import hookimpl
from lit_lowrank.optim.lowrank import LowRankOptimizer
from lit_lowrank.optim.validation import accepted, basis_problem, construct, with_quantizer_class
from lit_lowrank.projectors.base import Projector, Side
from lit_lowrank.quantizers.base import MIN_COSINE, QuantizerProbeError, probe_round_trip
from lit_lowrank.rules.base import RuleInputs
from lit_lowrank.transforms.base import Transform

SHAPES = ((12, 7), (7, 12), (9, 9), (1, 10), (10, 1))
"""Tall, wide, square, a single row, a single column."""
DTYPES = (torch.float32, torch.float64, torch.bfloat16)
RANK = 3
REFRESHES = 3
"""Refreshes of each projector on fresh gradients: a basis must keep its promised shape at each."""
RESERVED_STATE_KEYS = ("step",)
"""Per-weight state keys the optimizer owns: ``step`` is its 1-based step counter."""


# ---------------------------------------------------------------------------- projectors
def check_projector(cls: type, **options: Any) -> None:
    """Bases of the promised shape at every refresh (L m×r', Q n×r', 1 ≤ r' ≤ rank: never wider
    than ``rank``, never another outer dimension), orthonormal where ``cls.orthonormal`` (a
    quantized basis: within the quantizer's own error of the unquantized one), finite, and held
    as copies (no basis or ``state_dict`` tensor sharing the gradient's storage);
    ``project``/``project_back`` shapes; a ``state_dict`` of tensors only, round-tripping to
    identical bases; a ``batched`` projector's stacks projected slice by slice as each matrix
    alone; a tensor projector's per-mode bases of a 4-D kernel; with ``needs_gradient = False``,
    bases independent of the gradient's values and equal to what ``preview`` announced; and a
    bitwise resume."""
    resolved = with_quantizer_class(options)
    for shape in SHAPES:
        for dtype in DTYPES:
            for side in ("std", "full"):
                where = f"{cls.__name__} on a {shape[0]}×{shape[1]} {dtype} gradient, side {side}"
                _check_matrix_projector(cls, resolved, shape, dtype, side, where)
    if cls.batched and resolved.get("quantizer") is None:  # the optimizer keeps float bases for stacks
        _check_stack(cls, resolved)
    if cls.projects_tensors:
        _check_tensor(cls, resolved)
    _check_resume("projector", cls, options)


def _check_matrix_projector(cls: type, options: dict[str, Any], shape: tuple[int, int], dtype: torch.dtype,
                            side: str, where: str) -> None:
    """Refresh a projector :data:`REFRESHES` times on ``shape`` gradients, checking its bases
    after each, then its projections and its state dict."""
    rank = min(RANK, *shape)
    projector = construct(cls, options, rank=rank, side=side, seed=5)
    grads = [_randn(shape, dtype, seed=k) for k in range(REFRESHES)]
    if not cls.needs_gradient:
        _check_gradient_free(cls, options, grads, rank, side, where)
    for count, grad in enumerate(grads, start=1):
        previewed = None if cls.needs_gradient else projector.preview(grad)
        projector.refresh(grad)
        _check_bases(projector, grad, rank, f"{where}, refresh {count}")
        _expect_projector_copies(projector, grad, f"{where}, refresh {count}")
        _expect(previewed is None or _same(previewed, projector.bases()), f"{where}, refresh {count}",
                "needs_gradient = False, but the bases after refresh differ from what preview() gave before it")
        if count == 1 and projector.orthonormal:
            _check_orthonormal(cls, options, projector, grad, where)
    grad = grads[-1]
    low = projector.project(grad)
    back = projector.project_back(low)
    _expect(back.shape == grad.shape, where, f"project_back gave {tuple(back.shape)}")
    _expect(torch.isfinite(low).all() and torch.isfinite(back).all(), where, "non-finite R or lift")
    state = projector.state_dict()
    _expect_tensors_only(state, where, "the projector's state_dict()")
    restored = construct(cls, options, rank=rank, side=side, seed=5)
    restored.load_state_dict(_through_torch_save(state, where))
    for mine, theirs in zip(projector.bases(), restored.bases()):
        _expect(_same(mine, theirs), where, "bases differ after a state_dict round trip")


def _check_gradient_free(cls: type, options: dict[str, Any], grads: list[Tensor], rank: int, side: str,
                         where: str) -> None:
    """A projector declaring ``needs_gradient = False`` gives the same bases whatever the
    gradient's values (the optimizer may refresh it from a shape alone)."""
    projectors = [construct(cls, options, rank=rank, side=side, seed=5) for _ in range(2)]
    for grad in grads:
        projectors[0].refresh(grad)
        projectors[1].refresh(-3 * grad.flip(0) + 1)
    _expect(_same(tuple(projectors[0].bases()), tuple(projectors[1].bases())), where,
            "needs_gradient = False, but its bases depend on the gradient's values; set needs_gradient = True")


def _check_bases(projector: Any, grad: Tensor, rank: int, where: str) -> None:
    """The bases after a refresh: present for each side ``projector.side`` projects (absent for
    the others), rows matching the gradient's dimension, at most ``rank`` columns, finite."""
    try:
        bases = projector.bases()
    except Exception as error:  # a plugin's bug, reported with what it means
        raise AssertionError(f"{where}: refresh() left no basis — bases() raised {type(error).__name__}: {error}; "
                             f"refresh must set the basis of side {projector.side.name} "
                             "(fit returns L m×r' and/or Q n×r')") from error
    _expect(len(bases) == 2, where, f"bases() gave {len(bases)} tensors; a matrix projector returns (L, Q)")
    m, n = grad.shape
    rows = {Side.LEFT: (m, None), Side.RIGHT: (None, n), Side.BOTH: (m, n)}[projector.side]
    for label, basis, count, dim in zip(("L", "Q"), bases, rows, ("m", "n")):
        problem = _basis_problem(basis, count, rank, dim, projector.side)
        _expect(problem is None, where, f"basis {label} {problem}")


def _basis_problem(basis: Tensor | None, rows: int | None, rank: int, dim: str, side: Side) -> str | None:
    """What is wrong with one basis of a matrix projector, in words (None if nothing)."""
    if rows is None:
        return None if basis is None else f"is a {tuple(basis.shape)} tensor, but side {side.name} has no such basis"
    if basis is None:
        return f"is missing (None), but side {side.name} projects with it"
    if basis.ndim != 2:
        return f"is a {tuple(basis.shape)} tensor; a basis is a {dim}×r' matrix"
    if basis.shape[0] != rows:
        return (f"has {basis.shape[0]} rows, but the gradient's {dim} is {rows}: its outer dimension must match "
                "the matrix")
    if basis.shape[1] > rank:
        return (f"has {basis.shape[1]} columns, wider than rank {rank}: the moments are sized for at most rank "
                "columns")
    if basis.shape[1] < 1:
        return "has no columns; a basis keeps at least one direction"
    if not torch.isfinite(basis).all():
        return "has non-finite values (NaN or inf)"
    return None


def _check_orthonormal(cls: type, options: dict[str, Any], projector: Any, grad: Tensor, where: str) -> None:
    """``LᵀL = I`` (and ``QᵀQ``). A quantized basis (``quantizer`` in ``options``) cannot be
    orthonormal: the same projector without the quantizer must give orthonormal bases, and the
    quantized ones must lie within twice the quantizer's own round-trip error of them."""
    quantizer = options.get("quantizer")
    if quantizer is None:
        for label, basis in zip(("L", "Q"), projector.bases()):
            _expect_orthonormal(basis, label, where)
        return
    plain = {k: v for k, v in options.items() if k not in ("quantizer", "quantizer_args")}
    twin = construct(cls, plain, rank=projector.rank, side=projector.side_policy, seed=5)
    twin.refresh(grad)
    packer = quantizer(**(options.get("quantizer_args") or {}))
    for label, packed, basis in zip(("L", "Q"), projector.bases(), twin.bases()):
        if basis is None:
            continue
        _expect_orthonormal(basis, label, where, " without its quantizer")
        own_error = (packer.dequantize(packer.quantize(basis.float().T)).to(basis.dtype).T - basis).abs().max()
        error = (packed - basis).abs().max()
        slack = 2 * torch.finfo(basis.dtype).eps * basis.abs().max()
        _expect(error <= 2 * own_error + slack, where,
                f"the quantized basis {label} is {error:.3g} from the unquantized one, beyond twice the quantizer's "
                f"round-trip error ({own_error:.3g})")


def _expect_orthonormal(basis: Tensor | None, label: str, where: str, note: str = "") -> None:
    if basis is None:
        return
    gram = basis.double().mT @ basis.double()
    deviation = (gram - torch.eye(gram.shape[-1], dtype=torch.float64)).abs().max()
    tolerance = 5e-2 if basis.dtype == torch.bfloat16 else 1e-4
    _expect(deviation <= tolerance, where, f"basis {label}{note} is not orthonormal (‖{label}ᵀ{label} − I‖∞ = "
            f"{deviation:.3g}); set `orthonormal = False` on the class if that is by design")


def _check_stack(cls: type, options: dict[str, Any]) -> None:
    """A ``batched`` projector projects each slice of an E×m×n stack as it projects that slice alone."""
    for dtype in (torch.float32, torch.float64):
        where = f"{cls.__name__} (batched = True) on a 3×12×7 {dtype} stack"
        stack = _randn((3, 12, 7), dtype)
        stacked = construct(cls, options, rank=RANK, side="std", seed=5)
        stacked.refresh(stack)
        _expect_projector_copies(stacked, stack, where)
        wanted = {Side.LEFT: (12, None), Side.RIGHT: (None, 7), Side.BOTH: (12, 7)}[stacked.side]
        for label, basis, rows in zip(("L", "Q"), stacked.bases(), wanted):
            problem = basis_problem(basis, rows, RANK, (3,))
            _expect(problem is None, where, f"basis {label} is {problem}")
        lifted = stacked.project_back(stacked.project(stack))
        _expect(lifted.shape == stack.shape, where, f"project_back gave {tuple(lifted.shape)}")
        for index, matrix in enumerate(stack):
            alone = construct(cls, options, rank=RANK, side="std", seed=5)
            alone.refresh(matrix)
            _expect(torch.allclose(lifted[index], alone.project_back(alone.project(matrix)), rtol=1e-4, atol=1e-5),
                    where, f"slice {index} is projected otherwise than the same matrix alone")


def _check_tensor(cls: type, options: dict[str, Any]) -> None:
    """A tensor projector gives one orthonormal d_k×r_k basis per mode of a 4-D kernel gradient,
    a lift of the gradient's shape, and an idempotent projection."""
    for dtype in (torch.float32, torch.float64):
        where = f"{cls.__name__} on a 6×5×3×3 {dtype} kernel gradient"
        grad = _randn((6, 5, 3, 3), dtype)
        projector = construct(cls, options, rank=RANK, side="std", seed=5)
        projector.refresh(grad)
        _expect_projector_copies(projector, grad, where)
        bases = projector.bases()
        _expect(len(bases) == grad.ndim, where, f"{len(bases)} bases for {grad.ndim} modes")
        for mode, basis in enumerate(bases):
            problem = basis_problem(basis, grad.shape[mode], min(RANK, grad.shape[mode]))
            _expect(problem is None, where, f"the basis of mode {mode + 1} is {problem}")
        once = projector.project_back(projector.project(grad))
        _expect(once.shape == grad.shape, where, f"project_back gave {tuple(once.shape)}")
        twice = projector.project_back(projector.project(once))
        _expect(torch.allclose(once, twice, rtol=1e-4, atol=1e-5), where, "the projection is not idempotent")


# ---------------------------------------------------------------------------- quantizers
def check_quantizer(cls: type, **options: Any) -> None:
    """A finite round trip within ``2·max|x|`` of ``x`` for any shape (the optimizer's probe)
    that follows ``x`` (cosine similarity ≥ :data:`MIN_COSINE`: not zeros, not noise),
    tensor-only packed dicts that survive ``torch.save``, and a bitwise resume as the basis
    quantizer of a projector."""
    for shape in ((8, 32), (3, 5), (257,), (1, 1), (4, 3, 5)):
        for dtype in (torch.float32, torch.bfloat16):
            where = f"{cls.__name__} on a {shape} {dtype} tensor"
            quantizer = cls(**options)
            try:
                probe_round_trip(quantizer, cls.__name__)
            except QuantizerProbeError as error:
                raise AssertionError(f"{where}: {error}") from error
            x = _randn(shape, dtype)
            packed = quantizer.quantize(x.clone())
            _expect(isinstance(packed, dict) and all(isinstance(v, Tensor) for v in packed.values()), where,
                    "quantize must return a dict of tensors")
            restored = quantizer.dequantize(packed)
            _expect(tuple(restored.shape) == shape, where, f"dequantized to {tuple(restored.shape)}")
            _expect(torch.isfinite(restored).all(), where, "non-finite values after a round trip")
            error = (restored.float() - x.float()).abs().max()
            _expect(error <= 2 * x.float().abs().max() + 1e-6, where, f"round-trip error {error:.3g} beyond 2·max|x|")
            cosine = nn.functional.cosine_similarity(restored.double().flatten(), x.double().flatten(), dim=0)
            _expect(cosine >= MIN_COSINE, where,
                    f"the round trip does not follow its input (cosine similarity {cosine:.2f} < {MIN_COSINE}: zeros "
                    "or noise come back), so nothing it packs would train")
            again = quantizer.dequantize(_through_torch_save(packed, where))
            _expect(_same(restored, again), where, "the packed form does not survive torch.save")
    _check_resume("quantizer", cls, options)


# ---------------------------------------------------------------------------- update rules
def check_update_rule(cls: type, **options: Any) -> None:
    """``apply_`` changes the weight in place by a finite step of its shape, on every shape and dtype,
    leaves ``state["step"]`` (the optimizer's counter) alone and keeps state the checkpoint carries,
    as copies (none sharing storage with ``inputs.grad``, ``inputs.low``, ``inputs.direction`` or
    the weight); with ``uses_gradient = False`` the same step without the gradient; a ``batched``
    rule steps each slice of a stack as that weight alone; a ``shardable`` rule steps each rank's
    rows of a weight as the whole; an ``any_projection`` rule steps a kernel through a tensor
    projector without reading its side; a ``lifts_only`` rule changes the weight only through
    ``projector.add_back_`` and never reads it; ``state_layout`` declares the tensors ``apply_``
    keeps; and a bitwise resume (rule state included)."""
    for shape in SHAPES:
        for dtype in DTYPES:
            where = f"{cls.__name__} on a {shape[0]}×{shape[1]} {dtype} weight"
            rule = construct(cls, options, scale=0.25)
            grad = _randn(shape, dtype)
            before = _randn(shape, dtype, seed=1)
            projector = _svd(rule, grad)
            weight, state = _apply_rule(rule, before, grad, projector, where)
            _expect_declared_state(rule, grad, projector, state, where)
            _expect(weight.shape == before.shape and weight.dtype == dtype, where, "apply_ changed shape/dtype")
            _expect(torch.isfinite(weight).all(), where, "non-finite weight after apply_")
            _expect(not torch.equal(weight, before), where, "apply_ left the weight unchanged")
            _expect_state(state, where, "the rule's state")
            if not cls.uses_gradient:
                _check_without_gradient(cls, options, before, grad, weight, where)
    if cls.batched:
        _check_rule_stack(cls, options)
    if cls.shardable:
        _check_rule_rows(cls, options)
    if cls.any_projection:
        _check_any_projection(cls, options)
    if cls.lifts_only:
        _check_lifts_only(cls, options)
    _check_resume("rule", cls, options)


def _expect_declared_state(rule: Any, grad: Tensor, projector: Any, state: dict[str, Any], where: str) -> None:
    """``state_layout`` on ``meta`` tensors declares the non-scalar tensors ``apply_`` kept (keys,
    shapes, dtypes): the summary and the memory estimator predict ``state_bytes()`` from it."""
    low = projector.project(grad).to("meta")
    try:
        declared = _counted_layout(rule.state_layout(grad.to("meta"), low, projector))
    except Exception as error:  # noqa: BLE001 — named in the failure
        raise AssertionError(f"{where}: state_layout failed on meta tensors ({type(error).__name__}: {error}); "
                             "build the declared state from the shapes of grad and low alone") from error
    kept = _counted_layout(state)
    _expect(declared == kept, where, f"state_layout declares {declared} but apply_ keeps {kept}; declare what "
            "apply_ keeps, so the summary and the memory estimator count it")


def _counted_layout(tree: dict[str, Any]) -> dict[str, Any]:
    """What ``state_bytes()`` counts of a (nested) state dict: its non-scalar tensors as
    ``(shape, dtype)`` (0-dim tensors, Python numbers and dicts without either left out)."""
    layout = {}
    for key, value in tree.items():
        if isinstance(value, dict) and _counted_layout(value):
            layout[key] = _counted_layout(value)
        elif isinstance(value, Tensor) and value.ndim > 0:
            layout[key] = (tuple(value.shape), value.dtype)
    return layout


def _svd(rule: Any, grad: Tensor) -> Any:
    """An SVD projector of the rule's rank, refreshed on ``grad`` (m×n or E×m×n)."""
    projector = plugins.get_projector("svd")(rule.required_rank or min(RANK, *grad.shape[-2:]))
    projector.refresh(grad)
    return projector


def _apply_rule(rule: Any, weight: Tensor, grad: Tensor | None, projector: Any, where: str,
                low_grad: Tensor | None = None) -> tuple[Tensor, dict[str, Any]]:
    """A copy of ``weight`` after two ``apply_`` calls (a rule with history, a limiter, sees it
    on the second) with ``grad`` as ``G`` (``low_grad``'s projection as ``R``), and the state."""
    weight = weight.clone()
    low = projector.project(grad if low_grad is None else low_grad)
    state: dict[str, Any] = {"step": torch.zeros(())}  # as the optimizer keeps it
    for count in (1, 2):
        state["step"] += 1
        inputs = RuleInputs(grad, low, low.sign(), projector, state)
        rule.apply_(weight, inputs, step_size=1e-2)
        _expect(isinstance(state.get("step"), Tensor) and state["step"].item() == count, where,
                "apply_ changed state['step'], the optimizer's step counter; keep the rule's own state under "
                "other keys")
        _expect_no_reference(state, "state", {"inputs.grad": inputs.grad, "inputs.low": inputs.low,
                                              "inputs.direction": inputs.direction, "param": weight}, where)
    return weight, state


def _check_without_gradient(cls: type, options: dict[str, Any], before: Tensor, grad: Tensor, stepped: Tensor,
                            where: str) -> None:
    """A rule declaring ``uses_gradient = False`` takes the same step with ``grad=None`` (as
    layer-wise accumulation of projections passes it)."""
    rule = construct(cls, options, scale=0.25)
    try:
        weight, _ = _apply_rule(rule, before, None, _svd(rule, grad), where, low_grad=grad)
    except Exception as error:  # the rule read inputs.grad
        raise AssertionError(f"{where}: declares uses_gradient = False, but apply_ fails with grad=None "
                             f"({type(error).__name__}: {error}): it reads inputs.grad; set uses_gradient = True"
                             ) from error
    _expect(torch.equal(weight, stepped), where, "declares uses_gradient = False, but its step changes with "
            "inputs.grad; set uses_gradient = True")


def _check_rule_stack(cls: type, options: dict[str, Any]) -> None:
    """A ``batched`` rule steps an E×m×n stack as it steps each slice alone."""
    for dtype in (torch.float32, torch.float64):
        where = f"{cls.__name__} (batched = True) on a 3×12×7 {dtype} stack"
        rule = construct(cls, options, scale=0.25)
        grads, weights = _randn((3, 12, 7), dtype), _randn((3, 12, 7), dtype, seed=1)
        stacked, _ = _apply_rule(rule, weights, grads, _svd(rule, grads), where)
        for index, (grad, weight) in enumerate(zip(grads, weights)):
            alone, _ = _apply_rule(construct(cls, options, scale=0.25), weight, grad, _svd(rule, grad), where)
            _expect(torch.allclose(stacked[index], alone, rtol=1e-4, atol=1e-6), where,
                    f"slice {index} is stepped otherwise than the same weight alone")


def _check_any_projection(cls: type, options: dict[str, Any]) -> None:
    """A rule that takes ``any_projection`` steps a 4-D kernel through a tensor projector
    (Tucker: a core, no side) without reading ``projector.side``."""
    where = f"{cls.__name__} (any_projection = True) on a 6×5×3×3 float64 kernel with a tucker projector"
    rule = construct(cls, options, scale=0.25)
    grad, before = _randn((6, 5, 3, 3), torch.float64), _randn((6, 5, 3, 3), torch.float64, seed=1)
    projector = plugins.get_projector("tucker")(rule.required_rank or RANK)
    projector.refresh(grad)
    try:
        weight, _ = _apply_rule(rule, before, grad, _Sideless(projector), where)
    except _SideRead as error:
        raise AssertionError(f"{where}: declares any_projection = True, but apply_ reads projector.side; lift "
                             "only through project_back/add_back_, or set any_projection = False") from error
    _expect(weight.shape == before.shape and torch.isfinite(weight).all(), where, "a non-finite or reshaped weight")
    _expect(not torch.equal(weight, before), where, "apply_ left the weight unchanged")


def _check_lifts_only(cls: type, options: dict[str, Any]) -> None:
    """A ``lifts_only`` rule, handed a projector that records the lifts into the weight instead
    of writing them: on a finite weight, the weight is left bitwise as it was (written only
    through ``add_back_``) and a lift is recorded; on a weight of NaN, every lifted direction is
    finite (the weight is never read)."""
    where = f"{cls.__name__} (lifts_only = True) on a 12×7 float64 weight"
    rule = construct(cls, options, scale=0.25)
    grad = _randn((12, 7), torch.float64)
    projector = _svd(rule, grad)
    finite = _randn((12, 7), torch.float64, seed=1)
    before = finite.clone()
    lifts = _recorded_lifts(rule, finite, grad, projector, where)
    _expect(torch.equal(finite, before), where, "apply_ wrote the weight other than through projector.add_back_; "
            "set lifts_only = False")
    _expect(bool(lifts), where, "apply_ never lifted into the weight through projector.add_back_")
    lifts = _recorded_lifts(rule, torch.full_like(grad, float("nan")), grad, projector, where)
    _expect(all(bool(lift.isfinite().all()) for lift in lifts), where,
            "a lifted direction holds the NaN of a weight of NaN: apply_ reads the weight; set lifts_only = False")


def _recorded_lifts(rule: Any, weight: Tensor, grad: Tensor, projector: Any, where: str) -> list[Tensor]:
    """The directions ``rule.apply_`` lifts into ``weight`` (recorded, not written)."""
    recorder = _LiftRecorder(projector, weight)
    low = projector.project(grad)
    try:
        rule.apply_(weight, RuleInputs(grad, low, low.sign(), recorder, {"step": torch.ones(())}), step_size=1e-2)
    except Exception as error:
        raise AssertionError(f"{where}: apply_ raised {error!r}; a lifts_only rule never reads the weight and "
                             "raises nothing on valid inputs (or set lifts_only = False)") from error
    return recorder.lifts


class _LiftRecorder:
    """A projector whose ``add_back_`` into ``weight`` records the direction instead of writing it;
    everything else is the projector's own."""

    def __init__(self, projector: Any, weight: Tensor) -> None:
        self.whole, self.weight, self.lifts = projector, weight, []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.whole, name)

    def add_back_(self, target: Tensor, low: Tensor, alpha: float) -> Tensor:
        if target is not self.weight:
            return self.whole.add_back_(target, low, alpha)
        self.lifts.append(low.clone())
        return target


class _SideRead(Exception):
    """Raised by :class:`_Sideless` when a rule reads ``projector.side``."""


class _Sideless:
    """A projector without a side: project, lift and bases pass through, ``side`` raises."""

    def __init__(self, projector: Any) -> None:
        self.whole = projector

    @property
    def side(self) -> Side:
        raise _SideRead("projector.side")

    def bases(self) -> tuple[Tensor | None, ...]:
        return self.whole.bases()

    def project(self, grad: Tensor) -> Tensor:
        return self.whole.project(grad)

    def project_back(self, low: Tensor) -> Tensor:
        return self.whole.project_back(low)

    def add_back_(self, target: Tensor, low: Tensor, alpha: float) -> Tensor:
        return self.whole.add_back_(target, low, alpha)


def _check_rule_rows(cls: type, options: dict[str, Any]) -> None:
    """A ``shardable`` rule, run by two ranks (threads) on their rows of a weight as FSDP splits
    it — ``G``'s and ``W``'s rows, the rows of ``R`` and ``N`` under a right projection (else
    the whole), the left basis cut to the rank's rows, norms summed through ``reduce_grad`` and
    ``reduce_low`` — steps the rows as one process steps the whole weight (under both one-sided
    projections; also a two-sided one for a rule that takes ``any_projection``)."""
    cases = (((12, 7), "std"), ((7, 12), "std")) + ((((12, 7), "full"),) if cls.any_projection else ())
    for shape, side in cases:
        where = (f"{cls.__name__} (shardable = True) on a {shape[0]}×{shape[1]} float64 weight split by rows, "
                 f"side {side}")
        grad, weight = _randn(shape, torch.float64), _randn(shape, torch.float64, seed=1)
        rule = construct(cls, options, scale=0.25)
        projector = plugins.get_projector("svd")(rule.required_rank or RANK, side=side)
        projector.refresh(grad)
        whole, _ = _apply_rule(rule, weight, grad, projector, where)
        cut = shape[0] // 2
        blocks = (slice(0, cut), slice(cut, shape[0]))
        reduce = _ThreadSum(len(blocks))
        ranks = [_RankRows(construct(cls, options, scale=0.25), projector, rows, reduce, weight, grad)
                 for rows in blocks]
        for rank in _run_threads(ranks):
            _expect(torch.allclose(rank.weight, whole[rank.rows], rtol=1e-6, atol=1e-9), where,
                    f"rows {rank.rows.start}..{rank.rows.stop - 1} are stepped otherwise than in the whole weight: a "
                    "norm is not summed through inputs.reduce_grad / reduce_low; set shardable = False")


class _ThreadSum:
    """An all-reduce (sum, in place) among ``parties`` threads, one call per thread per round."""

    def __init__(self, parties: int) -> None:
        self.barrier = threading.Barrier(parties, timeout=60)
        self.parts: dict[int, Tensor] = {}

    def __call__(self, tensor: Tensor) -> Tensor:
        self.parts[threading.get_ident()] = tensor.clone()
        self.barrier.wait()
        total = sum(self.parts[key] for key in sorted(self.parts))
        self.barrier.wait()  # everyone has read the parts before the next round writes them
        return tensor.copy_(total)


class _RankRows:
    """One rank's share of a row-split weight, stepped by its own rule in :meth:`run`."""

    def __init__(self, rule: Any, projector: Any, rows: slice, reduce: _ThreadSum, weight: Tensor,
                 grad: Tensor) -> None:
        self.rule, self.projector, self.rows, self.reduce = rule, _RowsOf(projector, rows), rows, reduce
        self.weight, self.grad = weight[rows].clone(), grad[rows]
        low = projector.project(grad)
        self.split = projector.side == Side.RIGHT
        self.low = low[rows] if self.split else low
        self.error: BaseException | None = None

    def run(self) -> None:
        state: dict[str, Any] = {"step": torch.zeros(())}
        try:
            for _ in range(2):
                state["step"] += 1
                inputs = RuleInputs(self.grad, self.low, self.low.sign(), self.projector, state, self.reduce,
                                    self.reduce if self.split else None)
                self.rule.apply_(self.weight, inputs, step_size=1e-2)
        except BaseException as error:  # re-raised by _run_threads, after breaking the other's wait
            self.error = error
            self.reduce.barrier.abort()


class _RowsOf:
    """A projector as one rank holding ``rows`` of the weight applies it: the left basis cut to
    those rows (the optimizer's FSDP path does the same, lit_lowrank/optim/sharding.py)."""

    def __init__(self, projector: Any, rows: slice) -> None:
        self.whole, self.rows, self.side = projector, rows, projector.side

    def bases(self) -> tuple[Tensor | None, Tensor | None]:
        left, right = self.whole.bases()
        return None if left is None else left[self.rows], right

    project_back = Projector.project_back
    add_back_ = Projector.add_back_


def _run_threads(ranks: list[_RankRows]) -> list[_RankRows]:
    threads = [threading.Thread(target=rank.run) for rank in ranks]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    errors = [rank.error for rank in ranks if rank.error is not None]
    causes = [error for error in errors if not isinstance(error, threading.BrokenBarrierError)]
    if errors:
        raise (causes or errors)[0]
    return ranks


# ---------------------------------------------------------------------------- inner optimizers
def check_inner_optimizer(cls: type, **options: Any) -> None:
    """Directions shaped like ``R`` and finite, one per ``R`` of a list, each as that ``R`` alone;
    state without the optimizer's keys (``step``), holding no reference to an ``R`` it was handed,
    that survives ``torch.save`` and continues bitwise; ``rotate`` by identity maps leaving the
    moments unchanged; an ``elementwise`` optimizer's directions of a matrix equal to those of its
    pieces, and commuting with a permutation; a ``batched`` optimizer's stack stepped as each slice
    alone; one that ``steps_dense`` taking 1-D and 4-D gradients; and a bitwise resume across a
    refresh with ``on_refresh: rotate``."""
    resolved = with_quantizer_class(options)
    for shape in SHAPES:
        for dtype in DTYPES:
            where = f"{cls.__name__} on a {shape[0]}×{shape[1]} {dtype} R"
            _check_inner_on(cls, resolved, shape, dtype, where)
    _check_inner_lists(cls, resolved)
    if cls.elementwise:
        _check_elementwise(cls, resolved)
    if cls.batched:
        _check_inner_stack(cls, resolved)
    if cls.steps_dense:
        _check_dense_shapes(cls, resolved)
    _check_resume("inner", cls, options, on_refresh="rotate")


def _check_inner_on(cls: type, options: dict[str, Any], shape: tuple[int, int], dtype: torch.dtype,
                    where: str) -> None:
    inner = construct(cls, options)
    lows = [_randn(shape, dtype, seed=k) for k in range(4)]
    state = inner.init_state(lows[0])
    taken = [key for key in RESERVED_STATE_KEYS if key in state]
    _expect(not taken, where, f"init_state uses the key(s) {taken}: the optimizer keeps its step counter "
            "under 'step' in the same dict; name your state otherwise")
    for step, low in enumerate(lows[:2], start=1):
        directions = inner.directions([low], [state], step)
        _expect_no_reference(state, "state", {"low": low}, where)
        _expect(len(directions) == 1, where, f"{len(directions)} directions for one R")
        _expect(directions[0].shape == low.shape, where, f"a direction of shape {tuple(directions[0].shape)}")
        _expect(torch.isfinite(directions[0]).all(), where, "a non-finite direction")
    _expect_state(state, where, "the inner optimizer's state")
    saved = _through_torch_save(state, where)
    for step, low in enumerate(lows[2:], start=3):
        mine = inner.directions([low], [state], step)[0]
        theirs = inner.directions([low], [saved], step)[0]
        _expect(_same(mine, theirs), where, "a state reloaded through torch.save continues differently")
    rotated = copy.deepcopy(state)
    inner.rotate(rotated, torch.eye(shape[0], dtype=dtype), torch.eye(shape[1], dtype=dtype))
    _expect(_close(rotated, state), where, "rotate by identity maps changed the moments")


def _check_inner_lists(cls: type, options: dict[str, Any]) -> None:
    """``directions`` of a list of R (as the optimizer passes every weight at one step) gives one
    direction per R, each equal to that R's direction alone."""
    for dtype in (torch.float32, torch.float64):
        where = f"{cls.__name__} on a list of {len(SHAPES)} {dtype} R"
        lows = [_randn(shape, dtype, seed=k) for k, shape in enumerate(SHAPES)]
        together = _directions(construct(cls, options), lows)
        _expect(all(len(directions) == len(lows) for directions in together), where,
                f"{[len(d) for d in together]} directions per step for {len(lows)} R: a weight would not be updated")
        for index, low in enumerate(lows):
            alone = _directions(construct(cls, options), [low])
            _expect(all(torch.allclose(t[index], a[0], rtol=1e-5, atol=1e-7) for t, a in zip(together, alone)), where,
                    f"the direction of R {index} ({tuple(low.shape)}) differs from that R alone")


def _check_elementwise(cls: type, options: dict[str, Any]) -> None:
    """An ``elementwise`` optimizer: the directions of a matrix are the concatenation of those
    of its row blocks, and of its column blocks, and a permutation of rows and columns
    commutes with them (FSDP steps each rank's rows alone)."""
    for dtype in (torch.float32, torch.float64):
        where = f"{cls.__name__} (elementwise = True) on a 12×7 {dtype} R"
        low = _randn((12, 7), dtype)
        whole = _directions(construct(cls, options), [low])
        rows, cols = torch.randperm(12, generator=_generator(1)), torch.randperm(7, generator=_generator(2))
        permuted = _directions(construct(cls, options), [low[rows][:, cols]])
        _expect(all(torch.allclose(p[0], w[0][rows][:, cols], rtol=1e-5, atol=1e-7) for p, w in zip(permuted, whole)),
                where, "a permutation of R's rows and columns does not permute its directions alike: an entry "
                       "depends on its position; set elementwise = False")
        for dim, cut in ((0, 5), (1, 3)):
            pieces = _directions(construct(cls, options), list(low.split([cut, low.shape[dim] - cut], dim)))
            _expect(all(torch.allclose(torch.cat(p, dim), w[0], rtol=1e-5, atol=1e-7) for p, w in zip(pieces, whole)),
                    where, f"the directions of its {('row', 'column')[dim]} blocks differ from those of the whole: "
                           "an entry depends on others; set elementwise = False")


def _check_inner_stack(cls: type, options: dict[str, Any]) -> None:
    """A ``batched`` optimizer steps an E×m×n stack as it steps each slice alone."""
    for dtype in (torch.float32, torch.float64):
        where = f"{cls.__name__} (batched = True) on a 3×12×7 {dtype} stack"
        stack = _randn((3, 12, 7), dtype)
        stacked = _directions(construct(cls, options), [stack])
        for index, matrix in enumerate(stack):
            alone = _directions(construct(cls, options), [matrix])
            _expect(all(torch.allclose(s[0][index], a[0], rtol=1e-5, atol=1e-7) for s, a in zip(stacked, alone)),
                    where, f"slice {index} is stepped otherwise than the same matrix alone; set batched = False")


def _check_dense_shapes(cls: type, options: dict[str, Any]) -> None:
    """An optimizer that ``steps_dense`` takes the full gradients of dense parameters: biases
    (1-D) and conv kernels (4-D) too, one finite direction of each shape."""
    for shape in ((10,), (1,), (6, 5, 3, 3)):
        where = f"{cls.__name__} (steps_dense = True) on a {shape} gradient"
        low = _randn(shape, torch.float32)
        try:
            (direction,) = _directions(construct(cls, options), [low])[-1]
        except Exception as error:  # a plugin's bug, reported with what it means
            raise AssertionError(f"{where}: directions failed ({type(error).__name__}: {error}); an inner optimizer "
                                 "that steps dense parameters takes tensors of any shape, or sets steps_dense = False"
                                 ) from error
        _expect(direction.shape == low.shape and torch.isfinite(direction).all(), where,
                f"a direction of shape {tuple(direction.shape)} or with non-finite values")


def _directions(inner: Any, lows: list[Tensor], steps: int = 3) -> list[list[Tensor]]:
    """The directions ``inner`` gives at steps 1..``steps`` for fresh states of ``lows``, fed
    ``lows`` scaled by the step (so moments and current values differ)."""
    states = [inner.init_state(low) for low in lows]
    return [list(inner.directions([low * step for low in lows], states, step)) for step in range(1, steps + 1)]


# ---------------------------------------------------------------------------- schedules
def check_schedule(cls: type, **options: Any) -> None:
    """Refreshes at step 0; a schedule that takes ``gap`` (``update_gap``) refreshes again, but
    never sooner than ``gap`` steps after its last refresh; decisions that depend only on the
    state, a ``state_dict`` of tensors only (a reloaded schedule decides the same from then
    on), and a bitwise resume."""
    where = f"{cls.__name__}"
    schedule = construct(cls, options, gap=3)
    _expect(schedule.should_refresh(0), where, "no refresh at step 0: the projector would have no basis")
    for step in range(40):
        if step == 20:
            state = schedule.state_dict()
            _expect_tensors_only(state, where, "the schedule's state_dict()")
            twin = construct(cls, options, gap=3)
            twin.load_state_dict(_through_torch_save(state, where))
        refresh = schedule.should_refresh(step)
        if step >= 20:
            _expect(twin.should_refresh(step) == refresh, where, f"a reloaded schedule decides otherwise at step {step}")
        if refresh:
            similarity = None if step == 0 else 0.5 + 0.5 * ((step * 7) % 10) / 10
            schedule.after_refresh(step, similarity)
            if step >= 20:
                twin.after_refresh(step, similarity)
    if "gap" in accepted(cls) and "gap" not in options:
        for gap in (1, 3, 5):
            _check_cadence(cls, options, gap)
    _check_resume("schedule", cls, options)


def _check_cadence(cls: type, options: dict[str, Any], gap: int) -> None:
    """Over ``8·gap`` steps: refreshes at least ``gap`` steps apart, and more than one."""
    where = f"{cls.__name__} with update_gap {gap}"
    schedule = construct(cls, options, gap=gap)
    refreshed = []
    for step in range(8 * gap):
        if schedule.should_refresh(step):
            refreshed.append(step)
            schedule.after_refresh(step, None if step == 0 else 0.9)
    intervals = [b - a for a, b in zip(refreshed, refreshed[1:])]
    _expect(len(refreshed) > 1, where, f"never refreshes after step 0 in {8 * gap} steps: it ignores the gap it takes")
    _expect(min(intervals) >= gap, where,
            f"refreshes at steps {refreshed[:8]}: {min(intervals)} step(s) apart, more often than its gap (a subspace "
            "refresh, an SVD, at every step); set next_refresh in after_refresh")


# ---------------------------------------------------------------------------- the resume run
# ---------------------------------------------------------------------------- transforms
TRANSFORM_TARGETS = [r"blocks\.\d+\.0"]
"""The target linear layers of :func:`_transform_model` (one per block)."""


def check_transform(cls: type, **options: Any) -> None:
    """``cls(**options)`` applied to a small model's target linear layers: it names what it
    changed and says it is applied; applied again it changes nothing or is refused (ValueError);
    the model's outputs stay within the transform's declared ``tolerance`` (relative); its flags
    are booleans, and a transform hiding gradients binds to the optimizer (something must hand it
    the updates); where it can be undone, the undone model computes the same outputs with the
    original module classes and no longer holds the transform."""
    transform = cls(**options)
    _expect(isinstance(transform, Transform), cls.__name__, "is not a lit_lowrank.transforms.Transform")
    for flag in ("changes_targets", "needs_whole_weights", "hides_gradients", "adopts_modules"):
        _expect(isinstance(getattr(transform, flag), bool), cls.__name__, f"flag {flag} is not a bool")
    _expect(not transform.hides_gradients or type(transform).bind is not Transform.bind, cls.__name__,
            "hides gradients but does not bind to the optimizer: nothing would hand it the updates")
    model, inputs = _transform_model(), _randn((5, 8), torch.float32, seed=3)
    reference = copy.deepcopy(model).eval()
    _expect(not transform.applied(model), cls.__name__, "says a plain model is already transformed")
    changed = transform.apply(model, TRANSFORM_TARGETS, ())
    _expect(changed and transform.applied(model), cls.__name__, "apply() changed no target or applied() is false")
    _expect_outputs(model, reference, inputs, transform.tolerance, f"{cls.__name__} applied")
    _check_applied_twice(transform, model, reference, inputs)
    try:
        transform.undo(model)
    except NotImplementedError:
        return
    _expect(not transform.applied(model), cls.__name__, "undo() left applied() true")
    _expect_outputs(model, reference, inputs, transform.tolerance, f"{cls.__name__} undone")
    kinds = {name: type(m) for name, m in model.named_modules()}
    _expect(kinds == {name: type(m) for name, m in reference.named_modules()}, cls.__name__,
            f"undo() left other modules than the original's: {kinds}")


def _check_applied_twice(transform: Transform, model: nn.Module, reference: nn.Module, inputs: Tensor) -> None:
    """Applying again is refused with a ValueError, or leaves the outputs and the parameters' count."""
    count = sum(1 for _ in model.parameters())
    try:
        transform.apply(model, TRANSFORM_TARGETS, ())
    except ValueError:
        return
    where = f"{type(transform).__name__} applied twice"
    _expect(sum(1 for _ in model.parameters()) == count, where, "added parameters the second time")
    _expect_outputs(model, reference, inputs, transform.tolerance, where)


def _expect_outputs(model: nn.Module, reference: nn.Module, inputs: Tensor, tolerance: float, where: str) -> None:
    with torch.no_grad():
        out, expected = model.eval()(inputs), reference(inputs)
    error = float((out - expected).norm() / expected.norm())
    _expect(error <= tolerance + 1e-6, where, f"changes the outputs by {error:.2e} (relative), beyond its declared "
                                              f"tolerance {tolerance:.2e}")


class _TransformNet(nn.Module):
    """Two blocks of a biased linear layer and tanh, then a head: the targets are the blocks' layers."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(2))
        self.head = nn.Linear(8, 4)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def _transform_model() -> nn.Module:
    torch.manual_seed(0)
    return _TransformNet()


def _check_resume(option: str, cls: type, options: dict[str, Any], **extra: Any) -> None:
    """Train two weights (odd shapes) for 7 steps with the component, refreshing every 2 steps;
    the low-rank weights must move beyond weight decay, and a copy saved after step 3
    (mid-run) and after step 4 (a refresh next) must end bitwise equal."""
    with ExitStack() as stack:
        name = stack.enter_context(_registered(option, cls))
        options = stack.enter_context(_named_quantizer(options))
        settings = {**_component_settings(option, name, options), **extra}
        rank = settings.pop("rank", RANK)
        straight_model = _model()
        initial = copy.deepcopy(straight_model.state_dict())
        straight = _optimizer(straight_model, rank, settings)
        checkpoints = {}
        for step in range(7):
            if step in (3, 4):
                checkpoints[step] = (copy.deepcopy(straight_model.state_dict()),
                                     _through_torch_save(straight.state_dict(), f"{cls.__name__} resume"))
            _train_step(straight_model, straight, step)
        _check_trained(straight_model, initial, straight, cls)
        for start, (weights, optimizer_state) in checkpoints.items():
            model = _model()
            model.load_state_dict(weights)
            resumed = _optimizer(model, rank, settings)
            resumed.load_state_dict(optimizer_state)
            for step in range(start, 7):
                _train_step(model, resumed, step)
            for (label, mine), theirs in zip(straight_model.named_parameters(), model.parameters()):
                _expect(torch.equal(mine, theirs), f"{cls.__name__} resumed after step {start}",
                        f"{label} differs from the uninterrupted run")


def _check_trained(model: nn.Module, initial: dict[str, Tensor], optimizer: LowRankOptimizer, cls: type) -> None:
    """Each low-rank weight moved by more than its decoupled weight decay alone would move it."""
    lr, decay = optimizer.defaults["lr"], optimizer.defaults["weight_decay"]
    for label in ("0.weight", "2.weight"):
        decayed = initial[label] * (1 - lr * decay) ** 7
        _expect(not torch.allclose(model.state_dict()[label], decayed, rtol=0, atol=1e-6),
                f"{cls.__name__} in a 7-step run", f"{label} was never updated (it moved by weight decay only)")


def _component_settings(option: str, name: str, options: dict[str, Any]) -> dict[str, Any]:
    if option == "quantizer":  # the basis quantizer of an SVD projector
        return {"projector_args": {"quantizer": name, "quantizer_args": options}}
    settings = {option: name, f"{option}_args": options}
    if option == "rule":
        required = construct(plugins.get_update_rule(name), options, scale=0.25).required_rank
        settings.update({"rank": required} if required else {})
    return settings


@contextmanager
def _registered(option: str, cls: type) -> Iterator[str]:
    """``cls`` registered under a private name for the duration of the check."""
    kind = {"projector": "projectors", "quantizer": "quantizers", "rule": "update_rules",
            "inner": "inner_optimizers", "schedule": "schedules"}[option]
    name = f"conformance-{cls.__module__}.{cls.__qualname__}"

    Plugin = type("Plugin", (), {f"register_{kind}": hookimpl(lambda self, register: register(name, cls))})
    plugin_name = f"lit_lowrank.testing:{name}"
    plugins.register_plugin(Plugin(), name=plugin_name)
    try:
        yield name
    finally:
        plugins.unregister_plugin(plugin_name)


@contextmanager
def _named_quantizer(options: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """``options`` with a ``quantizer`` class registered under a private name and named by it:
    an optimizer's param groups (saved in its checkpoint) hold names, not classes."""
    if not isinstance(options.get("quantizer"), type):
        yield options
        return
    with _registered("quantizer", options["quantizer"]) as name:
        yield {**options, "quantizer": name}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(7, 12), nn.Tanh(), nn.Linear(12, 5))


def _optimizer(model: nn.Module, rank: int, settings: dict[str, Any]) -> LowRankOptimizer:
    matrices = [model[0].weight, model[2].weight]
    rest = [model[0].bias, model[2].bias]
    return LowRankOptimizer([{"params": matrices, "lowrank": True}, {"params": rest}], lr=1e-2,
                            weight_decay=0.01, rank=rank, update_gap=2, **settings)


def _train_step(model: nn.Module, optimizer: LowRankOptimizer, step: int) -> None:
    generator = torch.Generator().manual_seed(100 + step)
    inputs, targets = torch.randn(8, 7, generator=generator), torch.randn(8, 5, generator=generator)
    optimizer.zero_grad()
    nn.functional.mse_loss(model(inputs), targets).backward()
    optimizer.step()


# ---------------------------------------------------------------------------- helpers
def _randn(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> Tensor:
    return torch.randn(shape, generator=_generator(seed), dtype=torch.float64).to(dtype)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _through_torch_save(value: Any, where: str) -> Any:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    buffer.seek(0)
    try:
        return torch.load(buffer, weights_only=True)
    except Exception as error:
        raise AssertionError(f"{where}: the state does not load with torch.load(weights_only=True) "
                             f"({type(error).__name__}: {error}); keep it tensors and plain values") from error


def _expect_tensors_only(state: dict[str, Any], where: str, what: str) -> None:
    """A projector's or schedule's state dict: a flat dict of tensors (the optimizer moves and
    sizes each entry as a tensor)."""
    others = {key: type(value).__name__ for key, value in state.items() if not isinstance(value, Tensor)}
    _expect(not others, where, f"{what} holds {others}; it must hold tensors only (wrap numbers in torch.tensor)")


def _expect_state(state: dict[str, Any], where: str, what: str) -> None:
    """Per-weight state: tensors, Python numbers (kept as saved) or nested dicts of them."""
    for key, value in state.items():
        if isinstance(value, dict):
            _expect_state(value, where, f"{what}[{key!r}]")
        else:
            _expect(isinstance(value, (Tensor, numbers.Number)), where,
                    f"{what} holds {type(value).__name__} under {key!r}; per-weight state holds tensors, Python "
                    "numbers or dicts of them")


def _expect_projector_copies(projector: Any, grad: Tensor, where: str) -> None:
    """After ``refresh(grad)``, neither ``state_dict()`` nor ``bases()`` holds ``grad`` or a view of it."""
    _expect_no_reference(projector.state_dict(), "state_dict()", {"grad": grad}, where)
    _expect_no_reference(tuple(projector.bases()), "bases()", {"grad": grad}, where)


def _expect_no_reference(held: Any, label: str, handed: dict[str, Tensor | None], where: str) -> None:
    """No tensor in ``held`` (a nested dict or tuple, named ``label``) shares storage with a
    tensor it was ``handed`` (by name): the caller overwrites or frees those after the call (the
    next backward accumulates into ``.grad`` in place; layer-wise DDP frees each all-reduced ``R``
    after its step), so a kept reference would read other values or freed memory."""
    names = {_storage(tensor): name for name, tensor in handed.items() if tensor is not None}
    names.pop(None, None)
    for key, tensor in _held_tensors(held, label):
        name = names.get(_storage(tensor))
        _expect(name is None, where, f"{key} shares storage with {name}, the tensor it was handed: it keeps a "
                f"reference, which changes or is freed after the call (in-place gradient accumulation, layer-wise "
                f"DDP); keep a copy: {name}.clone()")


def _held_tensors(tree: Any, label: str) -> Iterator[tuple[str, Tensor]]:
    """Each tensor in a nested dict / tuple / list, with its path (``state['moments']['m']``)."""
    if isinstance(tree, Tensor):
        yield label, tree
    elif isinstance(tree, dict):
        for key, value in tree.items():
            yield from _held_tensors(value, f"{label}[{key!r}]")
    elif isinstance(tree, (tuple, list)):
        for index, value in enumerate(tree):
            yield from _held_tensors(value, f"{label}[{index}]")


def _storage(tensor: Tensor) -> int | None:
    """The address of ``tensor``'s storage, the same for every view of it; None for a meta tensor
    or an empty storage (nothing to share)."""
    if tensor.device.type == "meta" or tensor.untyped_storage().nbytes() == 0:
        return None
    return tensor.untyped_storage().data_ptr()


def _same(a: Any, b: Any) -> bool:
    """Bitwise equality of tensors (or None), recursing into dicts and tuples."""
    if isinstance(a, tuple):
        return isinstance(b, tuple) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, Tensor):
        return isinstance(b, Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    return a == b


def _close(a: Any, b: Any) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, Tensor) and a.is_floating_point():
        return torch.allclose(a.double(), b.double(), rtol=1e-3, atol=1e-6)
    return _same(a, b)


def _expect(condition: Any, where: str, problem: str) -> None:
    if not condition:
        raise AssertionError(f"{where}: {problem}")
