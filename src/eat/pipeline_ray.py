"""The main job on Ray (`eat run --ray`): its independent trainings and measurements as Ray tasks.

Two kinds of work, scheduled by Ray with what each needs:

- **trainings** (static, EAT, half-depth of every task): Ray tasks of ``train_cpus`` CPUs each, as many at once as
  the cluster's CPUs allow; the two-stage EAT model waits for its static run (it starts from it, a task
  dependency), the rest are independent;
- **timing stages** (per task: tuning, threshold sweep, the measured operating points and the report, i.e.
  :func:`eat.pipeline.run_task` once the models exist): one Ray task per task that asks for **every CPU of a node
  and that node's one** ``timing_slot`` (a custom resource). No two timing stages, and no training, share a node's
  cores while one runs, so latencies and speedup ratios are measured as on an idle machine. Start each node of a
  cluster with ``ray start ... --resources='{"timing_slot": 1}'``; a local Ray (``address="local"``) gets it
  automatically.

Results land where `eat run` writes them (``runs_dir/<task>/<variant>``, ``results_dir``), by the very functions
`eat run` uses, so the folders are the same and a rerun skips what is done (finished trainings are reused,
measured points are skipped by configuration hash). On a cluster of several machines ``runs_dir`` and
``results_dir`` must be on a filesystem every node sees.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from .pipeline import RunConfig, _train_variant, run_task, training_configs

TIMING_RESOURCE = "timing_slot"


def _train_one(config, folder: str, threads: int, *after: Any) -> str:
    """A Ray task: one training (or the reuse of a finished one). ``after``: runs it must wait for."""
    import torch

    torch.set_num_threads(threads)
    return str(_train_variant(config, Path(folder), print))


def _timing_stage(task: str, preset: str, runs_dir: str, results_dir: str, threads: int, kwargs: dict[str, Any],
                  *trained: str) -> dict[str, Any]:
    """A Ray task holding a whole node: :func:`eat.pipeline.run_task` (the trainings are done: it reuses them).
    Returns its summary plus where and when it ran (the test checks that no two overlap on one node)."""
    import ray
    import torch

    torch.set_num_threads(threads)
    started = time.time()
    summary = run_task(task, preset, Path(runs_dir), Path(results_dir), log=print, **kwargs)
    return {**summary, "node": ray.get_runtime_context().get_node_id(), "started": started, "ended": time.time(),
            "threads": threads}


def timing_node_cpus() -> int:
    """CPUs of the smallest alive node that offers a timing slot (a timing stage asks for all of them)."""
    import ray

    sizes = [int(node["Resources"].get("CPU", 0)) for node in ray.nodes()
             if node.get("Alive") and node["Resources"].get(TIMING_RESOURCE, 0) >= 1]
    if not sizes:
        raise ValueError(f"no node of this Ray cluster offers the {TIMING_RESOURCE!r} resource; start every node "
                         f"with ray start ... --resources='{{\"{TIMING_RESOURCE}\": 1}}' (timing stages take one each)")
    return max(1, min(sizes))


def init_ray(address: str | None, num_cpus: int | None = None) -> None:
    """Connect to Ray: ``"local"`` starts one on this machine with a timing slot (no dashboard, usage stats off);
    ``"auto"`` or an address joins a running cluster; an initialised Ray is used as it is."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address in (None, "local"):
        ray.init(num_cpus=num_cpus, resources={TIMING_RESOURCE: 1}, include_dashboard=False)
    else:
        ray.init(address=address, include_dashboard=False)


def run_tasks_ray(tasks: tuple[str, ...] | list[str], preset: str, runs_dir: Path, results_dir: Path, *,
                  address: str | None = "local", train_cpus: int = 1, run_kwargs: dict[str, Any] | None = None,
                  log=print) -> list[dict[str, Any]]:
    """:func:`eat.pipeline.run_task` for every task, its trainings and timing stages scheduled on Ray (module
    docstring). ``run_kwargs``: what `eat run` passes to ``run_task`` (train_overrides, recipe, max_drop,
    certify, user_data, bench_overrides, device). Returns each task's summary with its node and times."""
    import ray

    init_ray(address)
    run_kwargs = dict(run_kwargs or {})
    node_cpus = timing_node_cpus()
    train = ray.remote(_train_one)
    timing = ray.remote(_timing_stage)
    pending = []
    for task in tasks:
        run = RunConfig(task, preset, run_kwargs.get("recipe", "two-stage"), run_kwargs.get("max_drop"),
                        run_kwargs.get("certify"), **(run_kwargs.get("user_data") or {}))
        run.validate()
        configs = training_configs(run, Path(runs_dir), run_kwargs.get("train_overrides"))
        refs: dict[str, Any] = {}
        for variant, config in configs.items():  # static first: a two-stage EAT run waits for it
            after = [refs["static"]] if config.init_from and "static" in refs else []
            refs[variant] = train.options(num_cpus=train_cpus, name=f"train {task} {variant}").remote(
                config, str(Path(runs_dir) / task / variant), train_cpus, *after)
        log(f"{task}: trainings scheduled ({', '.join(configs)}), then a timing stage on {node_cpus} CPUs")
        pending.append(timing.options(num_cpus=node_cpus, resources={TIMING_RESOURCE: 1},
                                      name=f"timing {task}").remote(
            task, preset, str(runs_dir), str(results_dir), node_cpus, run_kwargs, *refs.values()))
    summaries = ray.get(pending)
    from .report import build_report

    build_report(Path(results_dir))  # once more with every task's rows (each stage built it with its own)
    return summaries


def overlapping_timing(summaries: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """Pairs of tasks whose timing stages ran on the same node at the same time (should be none)."""
    clashes = []
    for i, a in enumerate(summaries):
        for b in summaries[i + 1:]:
            if a["node"] == b["node"] and a["started"] < b["ended"] and b["started"] < a["ended"]:
                clashes.append((a["task"], b["task"]))
    return clashes


__all__ = ["TIMING_RESOURCE", "init_ray", "run_tasks_ray", "timing_node_cpus", "overlapping_timing"]
