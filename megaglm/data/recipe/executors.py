"""Running a recipe stage: one list of datatrove pipeline steps, executed by datatrove's
``LocalPipelineExecutor`` (``executor="local"``: a pool of processes on this machine) or
``RayPipelineExecutor`` (``executor="ray"``: one Ray actor per task on a running cluster). The step
list and the task count are the same either way, and each task reads the same shards, so both give
the same part files.

Resuming: each stage keeps datatrove's logging directory (``completions/<rank>`` markers, per-task
logs and stats) under the command's work directory; a rerun skips the tasks that completed. A stage
whose tasks did not all complete raises :class:`StageFailed` naming the incomplete tasks and the log
directory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

__all__ = ["ExecutorOptions", "StageFailed", "run_stage"]


class StageFailed(RuntimeError):
    """A stage finished with incomplete tasks (their logs are under the stage's logging directory)."""


@dataclass
class ExecutorOptions:
    """How stages run.

    Attributes:
        executor: ``"local"`` or ``"ray"``.
        workers: tasks run at once (local: processes; ray: actors), >= 1.
        ray_address: the cluster to join (``ray.init(address=...)``); None = ``RAY_ADDRESS``, a
            cluster already initialized in this process, or else a new single-machine Ray instance.
        cpus_per_task / mem_per_cpu_gb: Ray resources reserved per task.
        start_method: multiprocessing start method of the local pool.
    """

    executor: str = "local"
    workers: int = 1
    ray_address: Optional[str] = None
    cpus_per_task: int = 1
    mem_per_cpu_gb: float = 0.5
    start_method: str = "forkserver"


def run_stage(pipeline: Sequence[Any], tasks: int, logging_dir: str, options: ExecutorOptions,
              name: str = "stage") -> None:
    """Run ``pipeline`` as ``tasks`` tasks with the executor in ``options``.

    Args:
        pipeline: datatrove steps (the same objects for both executors).
        tasks: number of tasks (ranks ``0 .. tasks-1``).
        logging_dir: datatrove's logging directory for this stage (completion markers, logs, stats).
        options: :class:`ExecutorOptions`.
        name: shown in errors.

    Raises:
        ValueError: unknown executor or a non-positive ``tasks`` / ``workers``.
        StageFailed: some tasks did not complete.
    """
    if tasks < 1 or options.workers < 1:
        raise ValueError(f"tasks and workers must be >= 1, got {tasks} and {options.workers}")
    Path(logging_dir).mkdir(parents=True, exist_ok=True)
    workers = min(options.workers, tasks)
    if options.executor == "local":
        from datatrove.executor import LocalPipelineExecutor

        ex = LocalPipelineExecutor(list(pipeline), tasks=tasks, workers=workers, logging_dir=logging_dir,
                                   start_method=options.start_method)
    elif options.executor == "ray":
        import ray  # only on the Ray path
        from datatrove.executor.ray import RayPipelineExecutor

        if not ray.is_initialized():
            ray.init(address=options.ray_address or os.environ.get("RAY_ADDRESS") or None,
                     log_to_driver=False, include_dashboard=False, ignore_reinit_error=True)
        ex = RayPipelineExecutor(list(pipeline), tasks=tasks, workers=workers, logging_dir=logging_dir,
                                 cpus_per_task=options.cpus_per_task, mem_per_cpu_gb=options.mem_per_cpu_gb)
    else:
        raise ValueError(f"unknown executor {options.executor!r}: expected 'local' or 'ray'")
    ex.run()
    missing = ex.get_incomplete_ranks(range(tasks), skip_completed=True)
    if missing:
        raise StageFailed(
            f"{name}: tasks {missing[:10]} of {tasks} did not complete; see {logging_dir}/logs/ and "
            "run the same command again to resume (completed tasks are skipped)"
        )
