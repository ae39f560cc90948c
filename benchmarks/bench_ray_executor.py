"""The same campaign with the local executor and with Ray (2 workers, 1 CPU each) on this machine.

Per round, back to back in an order that alternates between rounds, each case a whole ``run_campaign`` into a
fresh folder, the driver loading the model as ``robustvtc run`` does:

* local (T threads) -- the units one after the other in this process, torch with T intra-op threads
  (T = 1 and T = the machine's cores);
* ray -- 2 actors of 1 CPU on a local cluster started once before the rounds (its start-up is printed
  apart; 4 logical CPUs so the warm case's idle actors leave room, but never more than 2 busy): each round
  starts fresh actors, so their model load is inside the time;
* ray warm -- the same on actors kept from the previous round (keep_workers): the steady state of a long
  campaign, where the load is paid once per worker;
* ray tasks (``--tasks``) -- one Ray task per unit building its own campaign: the model loaded per unit.

The figures are ratios taken within a round (local time / ray time: > 1 = Ray faster), median and range over
the rounds; the records of every case are checked equal to the first local run's (but for ``seconds``).

    python benchmarks/bench_ray_executor.py                       # built-in model, CPU, 3 rounds
    python benchmarks/bench_ray_executor.py --samples 32 --steps 10 --rounds 5 --tasks
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _load() -> str:
    one, five, _ = os.getloadavg()
    return f"load {one:.1f} (5 min {five:.1f}) on {os.cpu_count()} cores"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4, help="samples per unit")
    parser.add_argument("--steps", type=int, default=10, help="attack steps")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tasks", action="store_true", help="also time one Ray task per unit (slow: loads per unit)")
    args = parser.parse_args()

    import ray
    import torch

    from robustvtc.campaign import parse_scenario, read_records, record_key, run_campaign
    from robustvtc.campaign.executor import LocalExecutor
    from robustvtc.campaign.ray_executor import RayExecutor, release_workers

    scenario = parse_scenario({
        "model": "builtin", "samples": args.samples, "batch_size": args.batch, "steps": args.steps,
        "compressors": ["fastervlm", "visionzip"], "budgets": [16, 48], "attacks": ["fulltoken", "cage"],
        "examples": 1})
    units = -(-args.samples // args.batch) * 3
    root = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    cores = os.cpu_count() or 1
    start = time.perf_counter()
    # 4 logical CPUs: the warm case's 2 idle actors hold 2 while the fresh ones (or tasks) run on the other 2
    ray.init(num_cpus=4, include_dashboard=False, logging_level="WARNING")
    print(f"ray.init: {time.perf_counter() - start:.1f} s (once, not in the rounds)")
    print(f"campaign: builtin, {args.samples} samples in {units} units (clean, fulltoken, cage x {args.samples // args.batch}"
          f" chunks), 5 cells, {args.steps} steps; {_load()}")

    def local(threads):
        def run(out):
            torch.set_num_threads(threads)
            run_campaign(scenario, output=out, quiet=True, executor=LocalExecutor())
        return run

    def on_ray(keep):
        def run(out):
            torch.set_num_threads(1)
            run_campaign(scenario, output=out, quiet=True,
                         executor=RayExecutor(cpus_per_unit=1, workers=2, keep_workers=keep))
        return run

    def tasks(out):
        torch.set_num_threads(1)
        run_campaign(scenario, output=out, quiet=True, executor=_TaskExecutor())

    cases = {"local 1 thread": local(1), f"local {cores} threads": local(cores), "ray 2 workers": on_ray(False),
             "ray 2 warm workers": on_ray(True)}
    if args.tasks:
        cases["ray tasks"] = tasks
    on_ray(True)(root / "warmup")  # the warm case's actors exist before round 1
    times: dict[str, list[float]] = {name: [] for name in cases}
    reference = None
    for r in range(args.rounds):
        names = list(cases) if r % 2 == 0 else list(reversed(cases))
        for name in names:
            out = root / f"r{r}-{name.replace(' ', '-')}"
            t = time.perf_counter()
            cases[name](out)
            times[name].append(time.perf_counter() - t)
            records = {record_key(x): {k: v for k, v in x.items() if k != "seconds"}
                       for x in read_records(out / "results.jsonl")}
            reference = reference or records
            assert records == reference or name.startswith("local") and "1 thread" not in name, name
            shutil.rmtree(out)
        print(f"round {r + 1}: " + ", ".join(f"{n} {times[n][-1]:.1f} s" for n in cases) + f"; {_load()}")

    print(f"\n{'case':22s} {'median s':>9s}   local 1 thread / case (median, min-max over {args.rounds} rounds)")
    for name in cases:
        ratios = [a / b for a, b in zip(times["local 1 thread"], times[name])]
        print(f"{name:22s} {statistics.median(times[name]):9.1f}   {statistics.median(ratios):.2f} "
              f"({min(ratios):.2f}-{max(ratios):.2f})")
    best = f"local {cores} threads"
    ratios = [a / b for a, b in zip(times[best], times["ray 2 warm workers"])]
    print(f"{best} / ray 2 warm workers: {statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})")
    release_workers()
    ray.shutdown()
    shutil.rmtree(root, ignore_errors=True)


class _TaskExecutor:
    """One Ray task per unit, each building its campaign (loading the model): what actors avoid."""

    def run(self, campaign, units, done):
        import ray

        from robustvtc.campaign.ray_executor import shipping_campaign

        @ray.remote(num_cpus=1)
        def unit_task(campaign_class, scenario, output, unit, keys):
            import torch

            from robustvtc.models import load_model

            torch.set_num_threads(1)
            adapter = load_model(scenario.model, device=scenario.device, dtype=scenario.dtype)
            return shipping_campaign(campaign_class, scenario, adapter, output).unit(unit, keys)

        refs = [unit_task.remote(type(campaign), campaign.scenario, str(campaign.output), u,
                                 frozenset(k for k in campaign.unit_keys(u) if k in done)) for u in units]
        while refs:
            [ref], refs = ray.wait(refs, num_returns=1)
            records, files = ray.get(ref)
            campaign.write_side_files(files)
            yield from records


if __name__ == "__main__":
    main()
