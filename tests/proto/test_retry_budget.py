"""The retry budget: a fraction of first sends, a floor per second, a bounded burst."""

from __future__ import annotations

import pytest

from twinmesh.proto.retry_budget import RetryBudget


def test_retries_are_a_fraction_of_first_sends_once_the_burst_is_spent() -> None:
    budget = RetryBudget(ratio=0.1, floor=0.0, burst=2)
    assert budget.try_withdraw(0.0) and budget.try_withdraw(0.0)
    assert not budget.try_withdraw(0.0)
    for _ in range(9):
        budget.deposit(0.0)
    assert not budget.try_withdraw(0.0)  # 0.9 of a retry is no retry
    budget.deposit(0.0)
    assert budget.try_withdraw(0.0) and not budget.try_withdraw(0.0)


def test_the_floor_refills_an_idle_bucket_and_says_when() -> None:
    budget = RetryBudget(ratio=0.0, floor=2.0, burst=1)
    assert budget.try_withdraw(10.0)
    assert budget.ready_at() == 10.5
    assert not budget.try_withdraw(10.4)
    assert budget.try_withdraw(10.5)  # exactly when it said, despite float rounding


def test_saving_up_stops_at_the_burst() -> None:
    budget = RetryBudget(ratio=1.0, floor=1.0, burst=3)
    for _ in range(50):
        budget.deposit(0.0)
    assert sum(budget.try_withdraw(1000.0) for _ in range(10)) == 3


def test_without_a_floor_an_empty_bucket_never_refills_by_itself() -> None:
    budget = RetryBudget(ratio=0.5, floor=0.0, burst=1)
    budget.try_withdraw(0.0)
    assert budget.ready_at() is None and not budget.try_withdraw(1e6)


def test_a_clock_stepping_back_earns_nothing() -> None:
    budget = RetryBudget(ratio=0.0, floor=1.0, burst=1)
    budget.try_withdraw(100.0)
    assert not budget.try_withdraw(50.0) and not budget.try_withdraw(100.5)
    assert budget.try_withdraw(101.0)


def test_nonsense_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="burst >= 1"):
        RetryBudget(ratio=0.1, floor=1.0, burst=0)
