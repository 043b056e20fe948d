"""``megaglm-train`` / ``python -m megaglm.train``: the Hydra app that trains one rank.

With no overrides it runs the CPU demo: the ``tiny`` GLM preset on the standard-library docstring
corpus. Multi-rank runs start one process per rank through ``megaglm-launch`` (torchrun).

The run goes through the application layer (:mod:`megaglm.app`): the overrides are checked against the
schema (:func:`megaglm.app.compose.check_overrides`), the composed config is checked once into a frozen
run plan (:func:`megaglm.app.preflight.preflight`), and :func:`megaglm.app.run.run` trains it (the stage
chain for ``stage=NAME``). Bad input stops the run before anything heavy starts, with one message naming
the config key (or file) and what to change, and exit status 2; errors that only show later are
reported the same way. With several ranks every rank runs the same checks; rank 0 prints the message at
once and the others wait a moment before printing theirs (torchrun stops them as soon as rank 0 exits),
so a job prints it once. ``MEGAGLM_FULL_ERRORS=1`` (or ``HYDRA_FULL_ERROR=1``) shows the traceback.
"""

from __future__ import annotations

import os
import sys
from typing import Optional, Sequence

import hydra
from omegaconf import DictConfig

from megaglm.app.compose import CONF_DIR, check_overrides
from megaglm.app.errors import EXIT_USER_ERROR, USER_ERRORS, UserError, full_errors, report_error
from megaglm.config import register_configs

_PROG = "megaglm-train"


def _teardown() -> None:
    if "megaglm.parallel.init" in sys.modules:
        from megaglm.parallel.init import destroy

        destroy()


def train_from_overrides(overrides: Sequence[str]) -> int:
    """Plan and run ``megaglm-train <overrides>`` on this rank; returns the exit status (0 or 2)."""
    from megaglm.app.compose import compose_config
    from megaglm.app.output import configure_output
    from megaglm.app.preflight import preflight
    from megaglm.app.run import result_line, run

    try:
        cfg = compose_config(overrides)
        configure_output(bool(cfg.logging.verbose))
        plan = preflight(cfg, overrides=overrides)
        result = run(plan)
    except USER_ERRORS as err:
        if full_errors():
            raise
        report_error(str(err), prog=_PROG)
        _teardown()
        return EXIT_USER_ERROR
    line = result_line(result)
    if line and os.environ.get("RANK", "0") == "0":
        print(line, flush=True)
    _teardown()
    return 0


def _swept_on_command_line(key: str) -> bool:
    """Whether the command line sweeps ``key`` (``key=a,b``, ``key=range(...)`` ...): the user then named
    an output directory per job."""
    for arg in sys.argv[1:]:
        name, sep, value = arg.partition("=")
        if sep and name.lstrip("+~") == key and ("," in value or "(" in value):
            return True
    return False


def job_overrides() -> list[str]:
    """The overrides of the Hydra job being run. In a multirun (``-m``), each job gets its own output
    directory, ``<run.output_dir>/<job number>`` (Hydra's sweep directory, ``conf/config.yaml``), unless
    the command line sweeps ``run.output_dir`` itself; otherwise every job would resume from the
    previous job's checkpoint and share its TensorBoard directory."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    overrides = list(hc.overrides.task)
    if hc.mode == RunMode.MULTIRUN and not _swept_on_command_line("run.output_dir"):
        job_dir = str(hc.runtime.output_dir).replace("'", "\\'")
        overrides.append(f"run.output_dir='{job_dir}'")
        if os.environ.get("RANK", "0") == "0":
            print(f"multirun job {hc.job.num}: run.output_dir={hc.runtime.output_dir}", flush=True)
    return overrides


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def _hydra_entry(_: DictConfig) -> None:
    code = train_from_overrides(job_overrides())
    if code:
        sys.exit(code)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Console entry point (``megaglm-train``)."""
    register_configs()
    args = list(sys.argv[1:] if argv is None else argv)
    if not any(a.startswith("-") for a in args):  # Hydra's own flags (--help, --cfg, -m): Hydra checks
        try:
            check_overrides(args)
        except UserError as err:
            if full_errors():
                raise
            report_error(str(err), prog=_PROG)
            sys.exit(EXIT_USER_ERROR)
    if argv is not None:
        sys.argv = [sys.argv[0], *args]
    _hydra_entry()


if __name__ == "__main__":
    main()
