"""Where work units run. Only the driver (:func:`~robustvtc.campaign.runner.run_campaign`) writes records;
an executor streams them back.

A work unit is independent of every other (its targets are freshly seeded, its attack seeds itself), so an
executor may run units in any order, in any process: a distributed executor ships the scenario and the
units to workers that build their own campaign, and yields their records as they arrive.
"""
from __future__ import annotations

from typing import AbstractSet, Hashable, Iterable, Iterator, Protocol, Sequence


class UnitRunner(Protocol):
    """What an executor needs of a campaign: turn a unit into its records, skipping keys already done."""

    def run_unit(self, unit: Hashable, done: AbstractSet[tuple] = frozenset()) -> Iterable[dict]: ...


class Executor(Protocol):
    def run(self, campaign: UnitRunner, units: Sequence[Hashable], done: AbstractSet[tuple]) -> Iterator[dict]:
        """Records of ``units``, skipping those whose key is in ``done``, each yielded as soon as it exists."""


class LocalExecutor:
    """Runs the units one after the other in this process (the default)."""

    def run(self, campaign: UnitRunner, units: Sequence[Hashable], done: AbstractSet[tuple]) -> Iterator[dict]:
        for unit in units:
            yield from campaign.run_unit(unit, done)
