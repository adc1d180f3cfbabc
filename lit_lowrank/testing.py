"""Conformance checks for component authors: does a projector, quantizer, update rule, inner
optimizer or schedule keep the contract the optimizer relies on (docs/plugins.md)?

Each ``check_<kind>(cls, **options)`` builds ``cls`` as the optimizer would (``options`` are what
a user would write in ``<kind>_args``), runs it on odd shapes and dtypes, and raises
``AssertionError`` saying which check broke on which shape/dtype. They need neither pytest nor
Lightning; call them from your plugin's tests::

    from lit_lowrank.testing import check_projector

    def test_my_projector_keeps_the_contract():
        check_projector(MyProjector, oversample=4)

Every check ends with a bitwise-resume run: a small :class:`~lit_lowrank.LowRankOptimizer`
using the component is saved through ``torch.save``/``torch.load(weights_only=True)`` mid-run
and just before a refresh, reloaded into a fresh model and optimizer, and must continue exactly
as the uninterrupted run.
"""

from __future__ import annotations

import copy
import io
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from lit_lowrank import plugins
from lit_lowrank.hookspecs import hookimpl
from lit_lowrank.optim.lowrank import LowRankOptimizer
from lit_lowrank.optim.validation import basis_problem, construct
from lit_lowrank.projectors.base import Side
from lit_lowrank.quantizers.base import QuantizerProbeError, probe_round_trip
from lit_lowrank.rules.base import RuleInputs

SHAPES = ((12, 7), (7, 12), (9, 9), (1, 10), (10, 1))
"""Tall, wide, square, a single row, a single column."""
DTYPES = (torch.float32, torch.float64, torch.bfloat16)
RANK = 3


def check_projector(cls: type, **options: Any) -> None:
    """Bases of the promised shape (L m×r', Q n×r', 1 ≤ r' ≤ rank), orthonormal where
    ``cls.orthonormal``, finite; ``project``/``project_back`` shapes; ``state_dict`` tensors
    only, round-tripping to identical bases; a ``batched`` projector's stacks projected slice by
    slice as each matrix alone; a tensor projector's per-mode bases of a 4-D kernel; and a
    bitwise resume."""
    for shape in SHAPES:
        for dtype in DTYPES:
            for side in ("std", "full"):
                where = f"{cls.__name__} on a {shape[0]}×{shape[1]} {dtype} gradient, side {side}"
                rank = min(RANK, *shape)
                projector = construct(cls, options, rank=rank, side=side, seed=5)
                grad = _randn(shape, dtype)
                projector.refresh(grad)
                _check_bases(projector, grad, rank, where)
                low = projector.project(grad)
                back = projector.project_back(low)
                _expect(back.shape == grad.shape, where, f"project_back gave {tuple(back.shape)}")
                _expect(torch.isfinite(low).all() and torch.isfinite(back).all(), where, "non-finite R or lift")
                restored = construct(cls, options, rank=rank, side=side, seed=5)
                restored.load_state_dict(_through_torch_save(projector.state_dict(), where))
                for mine, theirs in zip(projector.bases(), restored.bases()):
                    _expect(_same(mine, theirs), where, "bases differ after a state_dict round trip")
    if cls.batched:
        _check_stack(cls, options)
    if cls.projects_tensors:
        _check_tensor(cls, options)
    _check_resume("projector", cls, options)


def _check_stack(cls: type, options: dict[str, Any]) -> None:
    """A ``batched`` projector projects each slice of an E×m×n stack as it projects that slice alone."""
    for dtype in (torch.float32, torch.float64):
        where = f"{cls.__name__} on a 3×12×7 {dtype} stack"
        stack = _randn((3, 12, 7), dtype)
        stacked = construct(cls, options, rank=RANK, side="std", seed=5)
        stacked.refresh(stack)
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
        bases = projector.bases()
        _expect(len(bases) == grad.ndim, where, f"{len(bases)} bases for {grad.ndim} modes")
        for mode, basis in enumerate(bases):
            problem = basis_problem(basis, grad.shape[mode], min(RANK, grad.shape[mode]))
            _expect(problem is None, where, f"the basis of mode {mode + 1} is {problem}")
        once = projector.project_back(projector.project(grad))
        _expect(once.shape == grad.shape, where, f"project_back gave {tuple(once.shape)}")
        twice = projector.project_back(projector.project(once))
        _expect(torch.allclose(once, twice, rtol=1e-4, atol=1e-5), where, "the projection is not idempotent")


def check_quantizer(cls: type, **options: Any) -> None:
    """A finite round trip within ``2·max|x|`` of ``x`` for any shape (the optimizer's probe),
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
            again = quantizer.dequantize(_through_torch_save(packed, where))
            _expect(_same(restored, again), where, "the packed form does not survive torch.save")
    _check_resume("quantizer", cls, options)


def check_update_rule(cls: type, **options: Any) -> None:
    """``apply_`` changes the weight in place by a finite step of its shape, on every shape and
    dtype, and a bitwise resume (rule state included)."""
    for shape in SHAPES:
        for dtype in DTYPES:
            where = f"{cls.__name__} on a {shape[0]}×{shape[1]} {dtype} weight"
            rule = construct(cls, options, scale=0.25)
            projector = plugins.get_projector("svd")(rule.required_rank or min(RANK, *shape))
            grad = _randn(shape, dtype)
            projector.refresh(grad)
            low = projector.project(grad)
            weight = _randn(shape, dtype, seed=1)
            before = weight.clone()
            state: dict[str, Any] = {"step": torch.zeros(())}  # as the optimizer keeps it
            for _ in range(2):  # a rule with history (a limiter) sees it on the second call
                state["step"] += 1
                rule.apply_(weight, RuleInputs(grad, low, low.sign(), projector, state), step_size=1e-2)
            _expect(weight.shape == before.shape and weight.dtype == dtype, where, "apply_ changed shape/dtype")
            _expect(torch.isfinite(weight).all(), where, "non-finite weight after apply_")
            _expect(not torch.equal(weight, before), where, "apply_ left the weight unchanged")
    _check_resume("rule", cls, options)


def check_inner_optimizer(cls: type, **options: Any) -> None:
    """Directions shaped like ``R`` and finite; state that survives ``torch.save`` and continues
    bitwise; ``rotate`` by identity maps leaving the moments unchanged; a bitwise resume across
    a refresh with ``on_refresh: rotate``."""
    for shape in SHAPES:
        for dtype in DTYPES:
            where = f"{cls.__name__} on a {shape[0]}×{shape[1]} {dtype} R"
            inner = construct(cls, options)
            lows = [_randn(shape, dtype, seed=k) for k in range(4)]
            state = inner.init_state(lows[0])
            for step, low in enumerate(lows[:2], start=1):
                (direction,) = inner.directions([low], [state], step)
                _expect(direction.shape == low.shape, where, f"a direction of shape {tuple(direction.shape)}")
                _expect(torch.isfinite(direction).all(), where, "a non-finite direction")
            saved = _through_torch_save(state, where)
            for step, low in enumerate(lows[2:], start=3):
                mine = inner.directions([low], [state], step)[0]
                theirs = inner.directions([low], [saved], step)[0]
                _expect(_same(mine, theirs), where, "a state reloaded through torch.save continues differently")
            rotated = copy.deepcopy(state)
            inner.rotate(rotated, torch.eye(shape[0], dtype=dtype), torch.eye(shape[1], dtype=dtype))
            _expect(_close(rotated, state), where, "rotate by identity maps changed the moments")
    _check_resume("inner", cls, options, on_refresh="rotate")


def check_schedule(cls: type, **options: Any) -> None:
    """Refreshes at step 0, decisions that depend only on the state (a reloaded schedule
    decides the same from then on), and a bitwise resume."""
    where = f"{cls.__name__}"
    schedule = construct(cls, options, gap=3)
    _expect(schedule.should_refresh(0), where, "no refresh at step 0: the projector would have no basis")
    for step in range(40):
        if step == 20:
            twin = construct(cls, options, gap=3)
            twin.load_state_dict(_through_torch_save(schedule.state_dict(), where))
        refresh = schedule.should_refresh(step)
        if step >= 20:
            _expect(twin.should_refresh(step) == refresh, where, f"a reloaded schedule decides otherwise at step {step}")
        if refresh:
            similarity = None if step == 0 else 0.5 + 0.5 * ((step * 7) % 10) / 10
            schedule.after_refresh(step, similarity)
            if step >= 20:
                twin.after_refresh(step, similarity)
    _check_resume("schedule", cls, options)


# ---------------------------------------------------------------------------- the resume run
def _check_resume(option: str, cls: type, options: dict[str, Any], **extra: Any) -> None:
    """Train two weights (odd shapes) for 7 steps with the component, refreshing every 2 steps;
    a copy saved after step 3 (mid-run) and after step 4 (a refresh next) must end bitwise equal."""
    with _registered(option, cls) as name:
        settings = {**_component_settings(option, name, options), **extra}
        rank = settings.pop("rank", RANK)
        straight_model = _model()
        straight = _optimizer(straight_model, rank, settings)
        checkpoints = {}
        for step in range(7):
            if step in (3, 4):
                checkpoints[step] = (copy.deepcopy(straight_model.state_dict()),
                                     _through_torch_save(straight.state_dict(), f"{cls.__name__} resume"))
            _train_step(straight_model, straight, step)
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
def _check_bases(projector: Any, grad: Tensor, rank: int, where: str) -> None:
    m, n = grad.shape
    rows = {Side.LEFT: (m, None), Side.RIGHT: (None, n), Side.BOTH: (m, n)}[projector.side]
    for label, basis, count in zip(("L", "Q"), projector.bases(), rows):
        problem = basis_problem(basis, count, rank)
        _expect(problem is None, where, f"basis {label} is {problem}")
        if basis is not None and projector.orthonormal:
            gram = basis.double().T @ basis.double()
            tolerance = 5e-2 if basis.dtype == torch.bfloat16 else 1e-4
            _expect(torch.allclose(gram, torch.eye(gram.shape[0], dtype=torch.float64), atol=tolerance), where,
                    f"basis {label} is not orthonormal (‖{label}ᵀ{label} − I‖∞ = "
                    f"{(gram - torch.eye(gram.shape[0], dtype=torch.float64)).abs().max():.3g}); set "
                    "`orthonormal = False` on the class if that is by design")


def _randn(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def _through_torch_save(value: Any, where: str) -> Any:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    buffer.seek(0)
    try:
        return torch.load(buffer, weights_only=True)
    except Exception as error:
        raise AssertionError(f"{where}: the state does not load with torch.load(weights_only=True) "
                             f"({type(error).__name__}: {error}); keep it tensors and plain values") from error


def _same(a: Any, b: Any) -> bool:
    """Bitwise equality of tensors (or None), recursing into dicts."""
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
