"""``first_nonfinite``: exact, whatever the dtype, and not fooled by sums that overflow;
``StepJournal`` undoes what it recorded; ``HeldInterrupt`` holds Ctrl-C until the block ends."""

from __future__ import annotations

import signal
import threading

import pytest
import torch

from lit_lowrank.optim.guard import HeldInterrupt, StepJournal, first_nonfinite


def test_finds_the_first_nan_or_inf_in_any_dtype():
    finite = [torch.randn(3, 4), torch.randn(5, dtype=torch.bfloat16)]
    assert first_nonfinite(finite) is None and first_nonfinite([]) is None
    for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
        for bad in (float("nan"), float("inf"), float("-inf")):
            tensor = torch.zeros(2, 3, dtype=dtype)
            tensor[1, 2] = bad
            assert first_nonfinite([*finite, tensor, tensor.clone()]) == 2, (dtype, bad)
    assert first_nonfinite([torch.tensor([float("inf"), float("-inf")])]) == 0  # a sum would give NaN anyway


def test_large_finite_values_are_not_flagged():
    huge = [torch.full((4,), 3e38), torch.full((8,), 6e4, dtype=torch.float16),
            torch.full((2,), 1e300, dtype=torch.float64)]
    assert first_nonfinite(huge) is None


def test_the_journal_undoes_each_kind_of_change_newest_first():
    class Counter:
        def __init__(self):
            self.count, self.table = 0, torch.zeros(3)

        def state_dict(self):
            return {"count": self.count, "table": self.table}

        def load_state_dict(self, state):
            self.count, self.table = state["count"], state["table"]

    weight, state, ledger, counter = torch.arange(4.0), {"kept": {"m": torch.ones(2)}}, {1: 4}, Counter()
    journal = StepJournal()
    journal.tensor(weight)
    weight.mul_(3)
    journal.tensor(weight)  # recorded once: the second record does not take the changed values
    journal.entry(state, "kept")
    journal.entry(state, "new")
    state["kept"]["m"].add_(1)
    state["new"] = torch.zeros(1)
    journal.contents(ledger)
    ledger[2] = 8
    journal.stateful(counter)
    counter.count += 1
    counter.table.add_(5)
    journal.attribute(counter, "count")  # after the stateful record: undone first, then the state's
    counter.count = 10
    journal.undo()
    assert torch.equal(weight, torch.arange(4.0)) and torch.equal(state["kept"]["m"], torch.ones(2))
    assert "new" not in state and ledger == {1: 4}
    assert counter.count == 0 and torch.equal(counter.table, torch.zeros(3))


def test_a_held_ctrl_c_is_raised_after_the_block():
    interrupt, finished = HeldInterrupt(), []
    with interrupt.held():
        signal.raise_signal(signal.SIGINT)
        finished.append(True)  # the block runs to its end
    assert finished and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with pytest.raises(KeyboardInterrupt):
        interrupt.raise_held()
    HeldInterrupt().raise_held()  # nothing held: nothing raised

    def elsewhere():  # outside the main thread signal handlers cannot be set: the block runs as is
        with HeldInterrupt().held():
            finished.append(signal.getsignal(signal.SIGINT) is signal.default_int_handler)

    thread = threading.Thread(target=elsewhere)
    thread.start()
    thread.join()
    assert finished == [True, True]


def test_a_held_ctrl_c_goes_to_the_handler_that_was_in_place():
    calls = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: calls.append(signum))
    try:
        interrupt = HeldInterrupt()
        with interrupt.held():
            signal.raise_signal(signal.SIGINT)
            assert calls == []  # held
        interrupt.raise_held()
        assert calls == [signal.SIGINT]
        interrupt.raise_held()  # delivered once
        assert calls == [signal.SIGINT]
    finally:
        signal.signal(signal.SIGINT, previous)
