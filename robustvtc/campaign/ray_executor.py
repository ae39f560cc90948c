"""Units as Ray actors: one campaign across GPUs and nodes, with one writer.

Each worker is a Ray actor that loads the model once -- on the GPU Ray grants it (Ray sets
CUDA_VISIBLE_DEVICES, so the worker's ``cuda`` is its own GPU) -- and builds its own
:class:`~robustvtc.campaign.runner.Campaign`. The driver, the process running
:func:`~robustvtc.campaign.runner.run_campaign`, hands each idle worker one unit, and as each unit finishes
(``ray.wait``) it writes the unit's side files (example maps, adversarial PNGs, shipped as bytes) and yields
its records to the loop that appends them to results.jsonl. Only the driver touches the output folder, so the
folder lock, the ledger, the torn-tail repair and ``--resume`` are exactly those of a local run.

* Records: a unit gives the same records in any process (runner.py: every evaluation is seeded from the
  scenario and what it evaluates), so a Ray run's records equal a local run's but for ``seconds`` -- with
  the same torch thread count (workers use ``threads:`` or ``cpus_per_unit``) and the same device kind.
* Actors, not tasks: a task would load the model per unit (or hide it in a process global); an actor holds
  it and the chunk's clean reference, and units of one chunk are sent to the worker that last ran that chunk
  (benchmarks/bench_ray_executor.py measures both). With ``keep_workers`` and Ray outliving the campaign (a
  driver that called ray.init itself), the workers wait, model loaded, for this process's next campaign --
  holding their CPUs and GPUs until :func:`release_workers` or the driver's exit.
* A worker that dies (killed, out of memory, node lost) is replaced by a fresh actor and its unit run again,
  up to ``max_attempts`` times; an error inside a unit (a bad option, a bug) stops the campaign with that
  error. A killed driver loses only the units in flight: ``--resume`` continues with any executor.
"""
from __future__ import annotations

import logging
import math
import os
import signal
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, AbstractSet, Iterator, Sequence

if TYPE_CHECKING:  # the campaign class travels to the workers as an argument: this module imports no runner
    from .runner import Campaign, WorkUnit

from ..errors import UserInputError
from .records import png_bytes

LOG = logging.getLogger("robustvtc")
INSTALL = ('executor: ray needs Ray, which is not installed; accepted: pip install "robustvtc[ray]" '
           "(or pip install ray), or executor: local")
TEST_WORKER_CRASH = "ROBUSTVTC_TEST_WORKER_CRASH"  # a file: the first worker to remove it SIGKILLs itself (tests)


def import_ray():
    """The ray module, or one line saying how to install it."""
    try:
        import ray
    except ImportError:
        raise UserInputError(INSTALL) from None
    return ray


class _Shipping:
    """Mixed into the driver's campaign class on a worker: side files are kept for the driver to write, never
    written on the worker."""

    shipped: list

    def _write_png(self, name: str, image) -> None:
        self.shipped.append(("png", name, png_bytes(image)))

    def _append_examples(self, lines: list[dict]) -> None:
        if lines:
            self.shipped.append(("examples", list(lines)))

    def unit(self, unit: WorkUnit, done: AbstractSet[tuple]) -> tuple[list[dict], list[tuple]]:
        self.shipped = []
        records = list(self.run_unit(unit, done))
        return records, self.shipped


def shipping_campaign(campaign_class, scenario, adapter, output: str):
    """A worker's campaign: ``campaign_class`` (the driver's) with its side files shipped, not written."""
    cls = type(f"Shipping{campaign_class.__name__}", (_Shipping, campaign_class), {})
    campaign = cls(scenario, adapter, output=output)
    campaign.shipped = []
    return campaign


class UnitWorker:
    """The body of a Ray actor: :meth:`bind` to a campaign (the model loaded once, kept for the next campaign
    of the same model), then one unit per :meth:`run` call."""

    def __init__(self, threads: int):
        import torch

        os.environ.pop("ROBUSTVTC_TEST_CRASH", None)  # the driver's crash hook is the driver's own
        torch.set_num_threads(threads)
        self.error: BaseException | None = None
        self.campaign = None
        self.loaded: tuple[tuple, object] | None = None  # (what was loaded, the adapter)
        import ray

        self.host = f"pid {os.getpid()} on {ray.util.get_node_ip_address()}"
        self.name = self.host

    def bind(self, scenario, output: str, campaign_class) -> None:
        try:
            self.error, self.campaign = None, None
            self.campaign = shipping_campaign(campaign_class, scenario, self._adapter(scenario), output)
        except Exception as exc:  # raised by run(), so the driver sees the error itself, not a dead actor
            self.error = exc

    def _adapter(self, scenario):
        import json

        import ray

        from ..models import load_model

        device = scenario.device
        if device.startswith("cuda"):
            gpus = ray.get_gpu_ids()
            if not gpus:
                raise UserInputError(f"device {device}, but Ray granted this worker no GPU; accepted: "
                                     "executor.gpus_per_unit >= a share of one GPU on a cluster with GPUs")
            device = "cuda"  # CUDA_VISIBLE_DEVICES is the GPU(s) Ray granted: cuda:0 is ours
            self.name = f"{self.host}, GPU {','.join(map(str, gpus))}"
        key = (scenario.model, device, scenario.dtype, json.dumps(scenario.model_kwargs, sort_keys=True, default=str))
        if self.loaded is None or self.loaded[0] != key:
            self.loaded = None  # the previous model freed first
            self.loaded = (key, load_model(scenario.model, device=device, dtype=scenario.dtype, **scenario.model_kwargs))
        return self.loaded[1]

    def run(self, unit: WorkUnit, done: AbstractSet[tuple]) -> dict:
        if self.error is not None:
            raise self.error
        crash = os.environ.get(TEST_WORKER_CRASH)
        if crash:
            try:
                os.unlink(crash)
            except FileNotFoundError:
                pass
            else:
                os.kill(os.getpid(), signal.SIGKILL)
        start = time.perf_counter()
        records, files = self.campaign.unit(unit, done)
        return {"records": records, "files": files, "worker": self.name, "seconds": time.perf_counter() - start}


def _portable(scenario):
    """The scenario with local relative paths (model folder, data) made absolute: a worker's working directory
    is its own. On other nodes those paths must exist too (a shared filesystem; docs/distributed.md)."""
    def absolute(value):
        return str(Path(value).expanduser().resolve()) if value and Path(value).expanduser().exists() else value
    data = replace(scenario.data, path=absolute(scenario.data.path), image_root=absolute(scenario.data.image_root))
    return replace(scenario, model=absolute(scenario.model), data=data)


# idle workers of finished keep_workers campaigns, by (Ray job of this driver, CPUs, GPUs, threads): the next
# campaign of this process reuses them, and their model when it is the same (tests, notebooks)
_POOL: dict[tuple, list] = {}


def release_workers() -> int:
    """Kill the workers that keep_workers campaigns left waiting (freeing their CPUs and GPUs); how many."""
    actors = [a for idle in _POOL.values() for a in idle]
    _POOL.clear()
    if actors:
        ray = import_ray()
        for actor in actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # noqa: BLE001 -- already gone (Ray shut down)
                pass
    return len(actors)


class RayExecutor:
    """Runs a campaign's units on Ray actors (see the module's text); the driver alone writes."""

    def __init__(self, address: str | None = None, gpus_per_unit: float = 0, cpus_per_unit: float = 1,
                 workers: int | None = None, max_attempts: int = 3, keep_workers: bool = False):
        import_ray()  # before the model loads: one line when Ray is missing
        self.address, self.gpus, self.cpus = address, gpus_per_unit, cpus_per_unit
        self.workers, self.max_attempts, self.keep_workers = workers, max_attempts, keep_workers
        self.stats: dict = {}  # after run: workers, units per worker, retries

    def driver_adapter(self, scenario):
        """The driver only plans (units, keys, manifest): a GPU scenario's driver loads the model on the CPU,
        leaving the GPUs to the workers. None = load it as the scenario says."""
        if not scenario.device.startswith("cuda") or "device_map" in scenario.model_kwargs:
            return None
        from ..models import load_model

        return load_model(scenario.model, device="cpu", dtype=scenario.dtype, **scenario.model_kwargs)

    def _connect(self, ray) -> bool:
        """Join the cluster (or start a local one); True when this call started Ray (and so shuts it down)."""
        if ray.is_initialized():
            return False
        try:
            ray.init(address=self.address, logging_level=logging.WARNING, configure_logging=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            where = self.address or os.environ.get("RAY_ADDRESS") or "a new local cluster"
            raise UserInputError(f"cannot start or reach Ray at {where}: {str(exc).splitlines()[0][:160]}; accepted: "
                                 "`ray start --head` then --address auto on a cluster node, ray://HEAD:10001 "
                                 "(pip install \"ray[client]\"), or no --address for a local cluster") from None
        return True

    def _count(self, ray, units: int) -> int:
        if self.workers:
            return min(self.workers, units)
        resources = ray.cluster_resources()
        fit = math.floor(resources.get("CPU", 0) / self.cpus + 1e-9)
        if self.gpus:
            fit = min(fit, math.floor(resources.get("GPU", 0) / self.gpus + 1e-9))
        if fit < 1:
            raise UserInputError(f"the Ray cluster ({resources.get('CPU', 0):g} CPUs, {resources.get('GPU', 0):g} "
                                 f"GPUs) cannot hold one worker of {self.cpus:g} CPUs and {self.gpus:g} GPUs; "
                                 "accepted: smaller executor.cpus_per_unit/gpus_per_unit, or more nodes")
        return min(fit, units)

    def run(self, campaign: Campaign, units: Sequence[WorkUnit], done: AbstractSet[tuple]) -> Iterator[dict]:
        ray = import_ray()
        units = list(units)
        if not units:
            return
        started = self._connect(ray)
        actors: dict[int, object] = {}
        try:
            scenario = _portable(campaign.scenario)
            threads = scenario.threads or max(1, int(self.cpus))
            remote = ray.remote(num_cpus=self.cpus, num_gpus=self.gpus, max_restarts=0)(UnitWorker)
            output = str(campaign.output)
            scenario_ref = ray.put(scenario)
            serial = iter(range(1 << 30))
            pool = _POOL.setdefault((ray.get_runtime_context().get_job_id(), self.cpus, self.gpus, threads), [])

            def spawn(reuse: bool = False) -> int:
                i = next(serial)
                actors[i] = pool.pop() if reuse and self.keep_workers and pool else remote.remote(threads)
                actors[i].bind.remote(scenario_ref, output, type(campaign))  # before the actor's first unit
                return i

            n = self._count(ray, len(units))
            LOG.info(f"ray: {n} workers x ({self.cpus:g} CPU, {self.gpus:g} GPU), {len(units)} units")
            free = [spawn(reuse=True) for _ in range(n)]
            pending, inflight, last_chunk = list(units), {}, {}
            attempts: dict[WorkUnit, int] = {}
            self.stats = {"workers": n, "units": {}, "retries": 0}

            def pick(worker: int) -> WorkUnit:
                """Prefer the chunk this worker last ran (its clean reference is cached), then a chunk nobody
                is running, then any."""
                busy = {u.chunk for _, u in inflight.values()}
                for good in (lambda u: u.chunk == last_chunk.get(worker), lambda u: u.chunk not in busy,
                             lambda u: True):
                    for i, unit in enumerate(pending):
                        if good(unit):
                            return pending.pop(i)
                raise AssertionError("no pending unit")

            while pending or inflight:
                while free and pending:
                    worker = free.pop(0)
                    unit = pick(worker)
                    keys = frozenset(k for k in campaign.unit_keys(unit) if k in done)
                    inflight[actors[worker].run.remote(unit, keys)] = (worker, unit)
                    last_chunk[worker] = unit.chunk
                [ref], _ = ray.wait(list(inflight), num_returns=1)
                worker, unit = inflight.pop(ref)
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayActorError as exc:  # the worker died: a fresh one, the unit again
                    attempts[unit] = attempts.get(unit, 0) + 1
                    ray.kill(actors.pop(worker), no_restart=True)
                    if attempts[unit] >= self.max_attempts:
                        raise RuntimeError(f"unit {unit} lost its worker {attempts[unit]} times; last: "
                                           f"{str(exc).splitlines()[0][:200]}") from None
                    LOG.warning(f"ray: a worker died running {unit}; running it again on a fresh worker")
                    self.stats["retries"] += 1
                    pending.insert(0, unit)
                    free.append(spawn())
                    continue
                except ray.exceptions.RayTaskError as exc:  # an error inside the unit: the campaign stops with it
                    cause = getattr(exc, "cause", None)
                    if isinstance(cause, UserInputError):
                        raise cause from None
                    raise
                if result["files"]:  # (a campaign kind that ships none, e.g. encoder screening, needs no writer)
                    campaign.write_side_files(result["files"])
                self.stats["units"][result["worker"]] = self.stats["units"].get(result["worker"], 0) + 1
                yield from result["records"]
                free.append(worker)
            if self.keep_workers and not started:  # Ray outlives this campaign: the workers wait for the next
                pool.extend(actors.pop(i) for i in list(actors))
        finally:
            for actor in actors.values():
                try:
                    ray.kill(actor, no_restart=True)
                except Exception:  # noqa: BLE001 -- already gone
                    pass
            if started:
                _POOL.clear()
                ray.shutdown()
