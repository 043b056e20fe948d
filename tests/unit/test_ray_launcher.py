"""The Ray launcher's config and entry points without a cluster: launcher vs run overrides, the typed
launcher config, overrides surviving the job entrypoint unchanged (with their types), the checks the
driver makes before it touches the cluster, and fast failures on unreachable addresses."""

from __future__ import annotations

import shlex
import time

import pytest
from omegaconf import OmegaConf

from megaglm.app.compose import CONF_DIR as _CONF_DIR
from megaglm.config import register_configs
from megaglm.launch.ray_cli import build_entrypoint, default_address, is_local_address
from megaglm.launch.ray_config import compose_launcher_config, split_overrides

TRICKY = [
    "model=tiny",
    "train.lr=1e-3",
    "train.train_iters=7",
    "data.split='90,5,5'",
    "data.blend=[0.7,/data/a b/x_text_document,0.3,/data/c_text_document]",
    "run.output_dir='runs/a b'",
    "logging.tensorboard_dir=null",
    "+launcher_note=not-a-launcher-key",  # starts with "launcher" but is not the group: a run override
]


def compose_run(overrides):
    from hydra import compose, initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=_CONF_DIR, version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_split_keeps_order_and_strings():
    ovs = ["launcher.num_workers=4", *TRICKY[:3], "launcher=ray_gpu", "+launcher.env.NCCL_DEBUG=INFO",
           *TRICKY[3:]]
    launcher, run = split_overrides(ovs)
    assert launcher == ["launcher.num_workers=4", "launcher=ray_gpu", "+launcher.env.NCCL_DEBUG=INFO"]
    assert run == TRICKY  # the same strings, same order


def test_launcher_config_is_typed_and_checked():
    cfg = compose_launcher_config([])
    assert cfg.num_workers == 1 and cfg.gpus_per_worker == 0 and cfg.strategy == "auto"
    cfg = compose_launcher_config(["launcher=ray_gpu", "launcher.num_workers=8", "launcher.max_restarts=5",
                                   "launcher.hang_timeout_s=90", "+launcher.env.NCCL_DEBUG=INFO"])
    assert (cfg.num_workers, cfg.gpus_per_worker, cfg.cpus_per_worker) == (8, 1.0, 8.0)
    assert isinstance(cfg.hang_timeout_s, float) and cfg.max_restarts == 5
    assert dict(cfg.env) == {"NCCL_DEBUG": "INFO"}
    with pytest.raises(ValueError, match="Did you mean 'launcher.num_workers'"):
        compose_launcher_config(["launcher.num_worker=4"])
    with pytest.raises(ValueError, match="could not be converted to Integer"):
        compose_launcher_config(["launcher.num_workers=four"])
    with pytest.raises(ValueError, match="launcher presets .*ray, ray_gpu"):
        compose_launcher_config(["launcher=nope"])
    with pytest.raises(ValueError, match="launcher.strategy='DIAGONAL'"):
        compose_launcher_config(["launcher.strategy=DIAGONAL"])
    with pytest.raises(ValueError, match="launcher.num_workers=0 must be >= 1"):
        compose_launcher_config(["launcher.num_workers=0"])
    with pytest.raises(ValueError, match="both 0"):
        compose_launcher_config(["launcher.cpus_per_worker=0"])


def test_overrides_survive_the_entrypoint_with_their_types():
    run = [ov for ov in TRICKY if not ov.startswith("+launcher_note")]
    entry = build_entrypoint(["launcher.num_workers=2", *run], python="/opt/py env/bin/python")
    argv = shlex.split(entry)  # what the job's shell hands the driver
    assert argv[:3] == ["/opt/py env/bin/python", "-m", "megaglm.launch.ray"]
    launcher, got = split_overrides(argv[3:])
    assert launcher == ["launcher.num_workers=2"] and got == run
    a, b = compose_run(run), compose_run(got)
    assert OmegaConf.to_container(a) == OmegaConf.to_container(b)
    assert a.train.lr == 1e-3 and isinstance(a.train.lr, float)
    assert a.data.split == "90,5,5" and a.train.train_iters == 7
    assert list(a.data.blend) == [0.7, "/data/a b/x_text_document", 0.3, "/data/c_text_document"]
    assert a.run.output_dir == "runs/a b" and a.logging.tensorboard_dir is None


def test_addresses(monkeypatch):
    assert is_local_address("http://127.0.0.1:8265") and is_local_address("localhost:8265")
    assert not is_local_address("http://10.1.2.3:8265")
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert default_address() == "http://127.0.0.1:8265"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # a GCS address, not the job API
    assert default_address() == "http://127.0.0.1:8265"
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://10.0.0.1:8265")
    assert default_address() == "http://10.0.0.1:8265"


def test_driver_refuses_bad_input_before_touching_the_cluster(capsys, tmp_path):
    from megaglm.launch.ray import EXIT_USER_ERROR, run_job

    base = [f"run.output_dir={tmp_path}", "launcher.address=127.0.0.1:1"]  # never reached
    assert run_job([*base, "train.train_iter=3"]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert "megaglm-ray: error: unknown config key 'train.train_iter'" in err and "train.train_iters" in err
    assert run_job([*base, "launcher.num_worker=3"]) == EXIT_USER_ERROR
    assert "Did you mean 'launcher.num_workers'" in capsys.readouterr().err
    # TP2 x PP2 needs a multiple of 4 ranks.
    assert run_job([*base, "launcher.num_workers=2", "parallel=tp2_pp2"]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert "launcher.num_workers=2" in err and "Traceback" not in err


def test_unreachable_addresses_fail_fast(capsys, tmp_path):
    pytest.importorskip("ray")
    from megaglm.launch.ray import EXIT_FAILED, run_job
    from megaglm.launch.ray_cli import main as cli

    t0 = time.monotonic()
    with pytest.raises(SystemExit) as exc:
        cli(["submit", "--address", "http://127.0.0.1:1", "--", "model=tiny"])
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert "cannot reach the Ray job API at http://127.0.0.1:1" in err and "ray start --head" in err
    for cmd in (["status", "x"], ["logs", "x"], ["stop", "x"], ["list"]):
        with pytest.raises(SystemExit) as exc:
            cli([*cmd, "--address", "http://127.0.0.1:1"])
        assert exc.value.code == 1
    capsys.readouterr()
    # The job driver pointed at a cluster address where nothing listens (ray.init would retry for minutes).
    assert run_job([f"run.output_dir={tmp_path}", "launcher.address=127.0.0.1:1"]) == EXIT_FAILED
    assert "nothing accepts connections at 127.0.0.1:1" in capsys.readouterr().err
    assert time.monotonic() - t0 < 60


def test_restart_resumes_from_own_checkpoint(tmp_path):
    from megaglm.app.run import plan_run
    from megaglm.launch.ray import resume_plan

    save = tmp_path / "ckpt"
    plan = plan_run([f"run.output_dir={tmp_path}", f"checkpoint.save_dir={save}",
                     "checkpoint.load_dir=/base/model", "checkpoint.load_optimizer=false"], 1, check_files=False)
    same, it = resume_plan(plan)  # nothing saved yet: start as the first attempt did
    assert it is None and same is plan
    (save / "iter_0000004").mkdir(parents=True)
    (save / "latest_checkpointed_iteration.txt").write_text("4")
    resumed, it = resume_plan(plan)
    assert it == 4
    assert resumed.config.checkpoint.load_dir is None and resumed.config.checkpoint.load_optimizer is True
    assert plan.config.checkpoint.load_dir == "/base/model"  # plans are frozen: a new one was made
    assert resumed.megatron == plan.megatron and resumed.layout == plan.layout
