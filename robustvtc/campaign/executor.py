"""Where work units run. The runner alone writes results; an executor only streams records back.

A work unit is independent of every other (its targets are freshly seeded, its attack seeds itself), so an
executor may run units in any order, on any machine: a distributed executor ships the scenario
(``campaign.scenario``) and the units to workers that build their own :class:`Campaign`, and yields their
records as they arrive.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, AbstractSet, Iterator, Sequence

if TYPE_CHECKING:
    from .runner import Campaign, WorkUnit


class Executor(ABC):
    @abstractmethod
    def run(self, campaign: "Campaign", units: Sequence["WorkUnit"], done: AbstractSet[tuple]) -> Iterator[dict]:
        """Records of ``units``, skipping those whose key is in ``done``, each yielded as soon as it exists."""


class LocalExecutor(Executor):
    """Runs the units one after the other in this process (the default)."""

    def run(self, campaign: "Campaign", units: Sequence["WorkUnit"], done: AbstractSet[tuple]) -> Iterator[dict]:
        for unit in units:
            yield from campaign.run_unit(unit, done)
