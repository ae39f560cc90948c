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


def make_executor(spec=None) -> Executor:
    """The executor a scenario's ``executor:`` names (an :class:`~robustvtc.campaign.scenario.ExecutorSpec`;
    None = local). ``ray`` without Ray installed is one line saying how to install it."""
    if spec is None or spec.type == "local":
        return LocalExecutor()
    if spec.type == "ray":
        from .ray_executor import RayExecutor

        return RayExecutor(address=spec.address, gpus_per_unit=spec.gpus_per_unit, cpus_per_unit=spec.cpus_per_unit,
                           workers=spec.workers)
    raise ValueError(f"unknown executor type {spec.type!r}")
