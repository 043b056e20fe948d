"""Careless input to the CLIs: every case stops with one message that names the file / line / config key
and what to do, exit status 2 (train) or 1 (preprocess), no traceback, and nothing written before is
damaged. Fast: the training cases fail in the pre-flight checks, before process groups or models.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from megaglm.app.compose import CONF_DIR, check_overrides
from megaglm.app.errors import UserError, report_error
from megaglm.app.preflight import preflight
from megaglm.config import register_configs
from megaglm.data import preprocess as pp
from megaglm.data.inputs import BATCH_DOCS
from megaglm.training.checkpointing import TRACKER_FILE, latest_iteration

REPO = Path(__file__).resolve().parents[2]
FAST = ["train.train_iters=1", "train.seq_length=64", "train.eval_interval=0",
        "logging.tensorboard_dir=null"]


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def compose_cfg(overrides=()):
    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("config", overrides=list(overrides))


def preflight_error(tmp_path, overrides=(), world=1, monkeypatch=None) -> str:
    ovs = [f"run.output_dir={tmp_path / 'run'}", *FAST, *overrides]
    cfg = compose_cfg(ovs)
    if monkeypatch is not None:  # as torchrun sets them for rank 0 of a ``world``-rank job
        monkeypatch.setenv("RANK", "0")
        monkeypatch.setenv("WORLD_SIZE", str(world))
    with pytest.raises((UserError, ValueError)) as exc:
        preflight(cfg, overrides=ovs)
    return str(exc.value)


def run_train(tmp_path, *overrides, env=None, timeout=120) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "HYDRA_FULL_ERROR")}
    full_env.update(env or {})
    cmd = [sys.executable, "-m", "megaglm.train", f"run.output_dir={tmp_path / 'run'}", *FAST, *overrides]
    return subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)


def assert_user_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    err = proc.stderr
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], err[-3000:])
    assert "Traceback" not in err, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("megaglm-train: error")]
    assert len(lines) == 1, err
    for n in needles:
        assert n in err, (n, err)
    return err


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------------------------------
# megaglm-preprocess
# --------------------------------------------------------------------------------------------------


def test_preprocess_bad_inputs_leave_existing_dataset_byte_for_byte(tmp_path, capsys):
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(3)))
    prefix = tmp_path / "out" / "ds"
    assert pp.main(["--input", str(good), "--output-prefix", str(prefix), "--quiet"]) == 0
    before = {s: sha(Path(str(prefix) + s)) for s in (".bin", ".idx")}

    # the bad line comes after more than one batch of good documents: temporary files were written
    n_good = BATCH_DOCS + 5
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(n_good))
                   + '{"text": "unterminated}\n')
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": ""}\n{"text": "   "}\n')
    cases = {
        "malformed": ([str(bad)], [f"{bad}:{n_good + 1}", "malformed JSON", "--skip-bad-lines"]),
        "not utf-8": ([str(latin)], [str(latin), "not valid UTF-8", "line 2", "iconv"]),
        "empty doc": ([str(empty)], ["no documents", "empty document", str(prefix)]),
        "missing": ([str(tmp_path / "nope.jsonl")], ["nope.jsonl", "does not exist"]),
    }
    for name, (inputs, needles) in cases.items():
        argv = [a for i in inputs for a in ("--input", i)] + ["--output-prefix", str(prefix), "--quiet"]
        assert pp.main(argv) == 1, name
        err = capsys.readouterr().err
        assert err.startswith("megaglm-preprocess: error: ") and "Traceback" not in err, (name, err)
        for n in needles:
            assert n in err, (name, n, err)
        assert {s: sha(Path(str(prefix) + s)) for s in (".bin", ".idx")} == before, name
        assert sorted(p.name for p in prefix.parent.iterdir()) == ["ds.bin", "ds.idx"], name


@pytest.mark.parametrize("prefix", ["out/", "out", ""])
def test_preprocess_directory_as_output_prefix(tmp_path, capsys, prefix):
    good = tmp_path / "good.jsonl"
    good.write_text('{"text": "hello"}\n')
    (tmp_path / "out").mkdir()
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert pp.main(["--input", str(good), "--output-prefix", prefix, "--quiet"]) == 1
    finally:
        os.chdir(cwd)
    err = capsys.readouterr().err
    assert "names a directory, not a dataset prefix" in err and "my_text_document" in err, err
    assert not list(tmp_path.glob("**/*.bin")) and not list(tmp_path.glob("**/.*.bin"))


def test_preprocess_unwritable_output_dir(tmp_path, capsys):
    good = tmp_path / "good.jsonl"
    good.write_text('{"text": "hello"}\n')
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert pp.main(["--input", str(good), "--output-prefix", str(blocker / "sub" / "ds"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "--output-prefix" in err and "cannot create the directory" in err, err


# --------------------------------------------------------------------------------------------------
# megaglm-train: the overrides (before Hydra)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("override, needles", [
    ("train.trian_iters=5", ["unknown config key 'train.trian_iters'", "'train.train_iters'"]),
    ("parallel.tensor_parallel_size=2", ["'parallel.tensor_parallel_size'",
                                         "'parallel.tensor_model_parallel_size'"]),
    ("train.tensor_model_parallel_size=2", ["'parallel.tensor_model_parallel_size'"]),
    # Hydra's own advice for an unknown key is '+key=...', which would add a setting nobody reads
    ("+train.trian_iters=5", ["'train.trian_iters' (added with '+')", "'train.train_iters'"]),
    ("data.tokenizer.typ=glm4", ["'data.tokenizer.typ'", "'data.tokenizer.type'"]),
    ("zzz=1", ["unknown config key 'zzz'", "Top-level sections"]),
    ("model=glm5", ["model=glm5: no such model preset", "tiny", "glm4_9b", "conf/model/"]),
    ("model=smal", ["Did you mean 'small'?"]),
    ("train.train_iters=abc", ["train.train_iters=abc", "could not be converted to Integer"]),
    ("parallel.sequence_parallel=maybe", ["parallel.sequence_parallel=maybe", "not a valid bool"]),
    ("model.num_layers=null", ["model.num_layers", "not Optional"]),
    ("data.blend=/data/x", ["data.blend=/data/x", "data.blend=[PREFIX]"]),
    ("data.split=9,1", ["data.split=9,1", "\"data.split='9,1'\""]),
    ("data.blend=0.5,a,0.5,b", ["data.blend is a list", "data.blend=[0.5,a,0.5,b]"]),
    ("train.train_iters=[1", ["cannot parse the override 'train.train_iters=[1'"]),
])
def test_overrides_are_checked_with_suggestions(override, needles):
    with pytest.raises(UserError) as exc:
        check_overrides([*FAST, override])
    msg = str(exc.value)
    for n in needles:
        assert n in msg, (n, msg)
    assert "\n" not in msg


def test_good_overrides_pass():
    check_overrides([*FAST, "model=small", "data=indexed", "data.blend=[0.5,/a,0.5,/b]",
                         "data.split='9,1,0'", "parallel=tp2_pp2", "checkpoint.load_dir=null",
                         "hydra.run.dir=/tmp/x", "logging.metrics_file=null"])


# --------------------------------------------------------------------------------------------------
# megaglm-train: the composed config (before process groups / model)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, needles", [
    (["train.train_iters=-1"], ["train.train_iters=-1 must be >= 0"]),
    (["logging.log_interval=0"], ["logging.log_interval=0"]),
    (["train.eval_interval=5", "train.eval_iters=0"], ["train.eval_iters=0", "train.eval_interval"]),
    (["checkpoint.save_interval=-5"], ["checkpoint.save_interval=-5"]),
    (["checkpoint.keep_last=0"], ["checkpoint.keep_last=0"]),
    (["train.lr_decay_style=cosnie"], ["train.lr_decay_style='cosnie'", "cosine"]),
    (["train.min_lr=1.0", "train.lr=0.1"], ["train.min_lr=1.0", "train.lr=0.1"]),
    (["train.adam_beta2=1.5"], ["train.adam_beta2=1.5"]),
    (["model.num_query_groups=3"], ["model.num_query_groups=3", "model.num_attention_heads=4"]),
    (["data.split='abc'"], ["data.split='abc'", "969,30,1"]),
    (["train.micro_batch_size=3"], ["train.global_batch_size=8", "train.micro_batch_size (3)"]),
    (["data=indexed"], ["data.blend is empty", "megaglm-preprocess"]),
    (["data=indexed", "data.blend=[/nonexistent/foo]"],
     ["data.blend[0]", "/nonexistent/foo.bin does not exist", "megaglm-preprocess"]),
    (["data=indexed", "data.blend=[0.5,/nonexistent/foo,0.5]"], ["data.blend has 3 entries", "pairs"]),
    (["data=indexed", "data.blend=[-1,/nonexistent/foo]"], ["data.blend[0] = -1", "positive"]),
])
def test_preflight_names_the_key(tmp_path, overrides, needles):
    msg = preflight_error(tmp_path, overrides)
    for n in needles:
        assert n in msg, (n, msg)


@pytest.mark.parametrize("world, overrides, needles", [
    (3, ["parallel.tensor_model_parallel_size=3"],
     ["parallel.tensor_model_parallel_size=3 does not divide model.num_attention_heads=4",
      "[1, 2, 4]"]),
    (3, ["parallel.tensor_model_parallel_size=2"],
     ["world size 3 is not divisible", "parallel.tensor_model_parallel_size (2)"]),
    (2, ["parallel.tensor_model_parallel_size=2", "model.num_attention_heads=6", "model.num_query_groups=3"],
     ["neither a divisor nor a multiple of model.num_query_groups=3"]),
    (4, ["train.micro_batch_size=4", "train.global_batch_size=8"],
     ["train.global_batch_size=8 is not divisible", "data-parallel size (4"]),
])
def test_preflight_checks_layout_against_launcher_world(tmp_path, monkeypatch, world, overrides, needles):
    msg = preflight_error(tmp_path, overrides, world=world, monkeypatch=monkeypatch)
    for n in needles:
        assert n in msg, (n, msg)


def test_default_config_passes_preflight(tmp_path, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "8")  # without RANK (no launcher) the run is one rank
    preflight(compose_cfg([f"run.output_dir={tmp_path}", *FAST]))


# --------------------------------------------------------------------------------------------------
# checkpoints to resume from
# --------------------------------------------------------------------------------------------------


def fake_checkpoint(save_dir: Path, iteration: int, model: dict) -> Path:
    """A checkpoint directory as far as the pre-flight reads it (pointer + megaglm_meta.json)."""
    d = save_dir / f"iter_{iteration:07d}"
    d.mkdir(parents=True)
    (d / "megaglm_meta.json").write_text(json.dumps({"iteration": iteration, "model": model}))
    (save_dir / TRACKER_FILE).write_text(str(iteration))
    return d


def tiny_model() -> dict:
    return OmegaConf.to_container(compose_cfg(["model=tiny"]).model, resolve=True)


def test_checkpoint_pointer_garbage_or_dangling(tmp_path):
    ck = tmp_path / "ck"
    fake_checkpoint(ck, 1, tiny_model())
    (ck / TRACKER_FILE).write_text("garbage\n")
    msg = preflight_error(tmp_path, [f"checkpoint.load_dir={ck}"])
    assert str(ck / TRACKER_FILE) in msg and "'garbage'" in msg and "iter_0000001" in msg, msg
    (ck / TRACKER_FILE).write_text("7")
    msg = preflight_error(tmp_path, [f"checkpoint.load_dir={ck}"])
    assert "points to iteration 7" in msg and "iter_0000007 is missing" in msg and "iter_0000001" in msg
    # the run's own save_dir (the default load_dir) is checked the same way
    msg = preflight_error(tmp_path, [f"checkpoint.save_dir={ck}"])
    assert "points to iteration 7" in msg


def test_explicit_load_dir_without_checkpoint_is_refused(tmp_path):
    msg = preflight_error(tmp_path, [f"checkpoint.load_dir={tmp_path / 'typo'}"])
    assert "checkpoint.load_dir=" in msg and "does not exist" in msg and "checkpoint.load_dir=null" in msg
    (tmp_path / "empty").mkdir()
    msg = preflight_error(tmp_path, [f"checkpoint.load_dir={tmp_path / 'empty'}"])
    assert "holds no checkpoint" in msg and TRACKER_FILE in msg
    # load_dir == save_dir on a first run (Megatron-LM style --save X --load X) starts from scratch
    cfg = compose_cfg([f"run.output_dir={tmp_path}", *FAST, f"checkpoint.save_dir={tmp_path / 's'}",
                       f"checkpoint.load_dir={tmp_path / 's'}"])
    preflight(cfg)


def test_checkpoint_of_another_model_is_refused_naming_fields(tmp_path):
    ck = tmp_path / "ck"
    fake_checkpoint(ck, 1, tiny_model())
    msg = preflight_error(tmp_path, ["model=small", f"checkpoint.load_dir={ck}"])
    for field in ("model.num_layers: checkpoint 4 vs run 8", "model.hidden_size: checkpoint 128 vs run 384",
                  "model.num_attention_heads: checkpoint 4 vs run 6"):
        assert field in msg, msg
    assert "model=" in msg
    # resuming implicitly from the run's own save_dir also says how to start a separate run
    msg = preflight_error(tmp_path, ["model=small", f"checkpoint.save_dir={ck}"])
    assert "model.num_layers" in msg and "run.output_dir" in msg
    # same model: accepted
    preflight(compose_cfg([f"run.output_dir={tmp_path}", *FAST, f"checkpoint.load_dir={ck}"]))


def test_own_checkpoint_wins_over_the_load_dir_it_started_from(tmp_path):
    """Fine-tuning from a base (checkpoint.load_dir) and interrupted: rerunning the command resumes the
    run's own checkpoint, with its optimizer, and says so; it does not start over from the base."""
    base, own = tmp_path / "base", tmp_path / "run" / "checkpoints"
    fake_checkpoint(base, 1, tiny_model())
    ovs = [f"run.output_dir={tmp_path / 'run'}", *FAST, f"checkpoint.load_dir={base}",
           "checkpoint.load_optimizer=false"]
    first = preflight(compose_cfg(ovs), overrides=ovs)
    assert first.config.checkpoint.load_dir == str(base) and first.resume_notes == ()
    fake_checkpoint(own, 5, tiny_model())
    again = preflight(compose_cfg(ovs), overrides=ovs)
    assert again.config.checkpoint.load_dir is None and again.config.checkpoint.load_optimizer is True
    assert again.resume_notes[0].startswith("resuming this run's own checkpoint (iteration 5")
    assert f"rather than checkpoint.load_dir={base}" in again.resume_notes[0]


def test_checkpoint_without_meta_is_refused(tmp_path):
    ck = tmp_path / "ck"
    (fake_checkpoint(ck, 3, tiny_model()) / "megaglm_meta.json").unlink()
    msg = preflight_error(tmp_path, [f"checkpoint.load_dir={ck}"])
    assert "iter_0000003" in msg and "megaglm_meta.json" in msg


_KILL_SCRIPT = textwrap.dedent("""
    import os, pathlib, signal, sys, types
    # stand-ins for megatron-core so the real publish logic of save_checkpoint runs in a second
    fake_dc = types.SimpleNamespace()
    core = types.ModuleType("megatron.core"); core.dist_checkpointing = fake_dc
    sys.modules.update({"megatron": types.ModuleType("megatron"), "megatron.core": core})
    from megaglm.training import checkpointing as ck
    ck._sharded_state = lambda *a, **k: {}
    ck._layout = lambda: {"tensor_model_parallel_size": 1}
    save_dir, iteration, where = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    die = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)

    def save(state, path):
        (pathlib.Path(path) / "__0_0.distcp").write_bytes(b"new" * 1000)
        if where == "during_save":
            die()
    fake_dc.save = save
    if where == "before_pointer":
        os.replace = die
    if where == "between_renames":
        real_rename, calls = pathlib.Path.rename, []
        def rename(self, target):
            calls.append(target)
            if len(calls) == 2:
                die()
            return real_rename(self, target)
        pathlib.Path.rename = rename
    ck.save_checkpoint(save_dir, iteration, [], None, None, consumed_train_samples=0,
                       consumed_valid_samples=0, model_config={"num_layers": 4})
    print("finished")
""")


def _save_and_kill(save_dir: Path, iteration: int, where: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _KILL_SCRIPT, str(save_dir), str(iteration), where],
                          cwd=REPO, capture_output=True, text=True, timeout=120)


def _snapshot(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): sha(p) for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("where", ["during_save", "before_pointer"])
def test_sigkill_during_save_keeps_previous_checkpoint_and_pointer(tmp_path, where):
    ck = tmp_path / "ck"
    prev = fake_checkpoint(ck, 1, {"num_layers": 4})
    (prev / "__0_0.distcp").write_bytes(b"old" * 1000)
    before = _snapshot(prev)
    proc = _save_and_kill(ck, 2, where)
    assert proc.returncode == -9 and "finished" not in proc.stdout, (proc.returncode, proc.stderr[-2000:])
    assert (ck / TRACKER_FILE).read_text() == "1"
    assert latest_iteration(ck) == 1 and _snapshot(prev) == before
    # the interrupted save left iter_2.tmp (killed while writing) or an unpublished iter_2 (killed
    # before the pointer moved); neither is ever loaded
    assert (ck / "iter_0000002.tmp").is_dir() or (ck / "iter_0000002").is_dir()


def test_sigkill_while_replacing_a_resaved_iteration_names_the_old_copy(tmp_path):
    ck = tmp_path / "ck"
    prev = fake_checkpoint(ck, 2, {"num_layers": 4})
    (prev / "__0_0.distcp").write_bytes(b"old" * 1000)
    before = _snapshot(prev)
    assert _save_and_kill(ck, 2, "between_renames").returncode == -9
    assert _snapshot(ck / "iter_0000002.old") == before  # the previous copy is intact ...
    with pytest.raises(ValueError) as exc:  # ... and the error says how to get it back
        latest_iteration(ck)
    assert "iter_0000002.old" in str(exc.value) and "rename it to iter_0000002" in str(exc.value)


# --------------------------------------------------------------------------------------------------
# the command lines end to end (exit status, one message, no traceback)
# --------------------------------------------------------------------------------------------------


def test_cli_misspelled_key_wrong_type_unknown_preset(tmp_path):
    assert_user_error(run_train(tmp_path, "train.trian_iters=5"), "train.trian_iters", "train.train_iters")
    assert_user_error(run_train(tmp_path, "train.train_iters=abc"), "train.train_iters=abc")
    assert_user_error(run_train(tmp_path, "model=glm5"), "model=glm5", "tiny")
    assert not (tmp_path / "run").exists()


def test_cli_layout_data_and_checkpoint_errors(tmp_path):
    # a 3-rank job as torchrun would start rank 0 of it: the layout fails before any process group
    env = {"RANK": "0", "WORLD_SIZE": "3", "LOCAL_RANK": "0"}
    assert_user_error(run_train(tmp_path, "parallel.tensor_model_parallel_size=3", env=env),
                      "parallel.tensor_model_parallel_size=3", "model.num_attention_heads=4")
    assert_user_error(run_train(tmp_path, "data=indexed", "data.blend=[/nonexistent/foo]"),
                      "/nonexistent/foo.bin does not exist")
    ck = tmp_path / "ck"
    fake_checkpoint(ck, 1, tiny_model())
    assert_user_error(run_train(tmp_path, "model=small", f"checkpoint.load_dir={ck}"),
                      "model.num_layers: checkpoint 4 vs run 8")
    assert latest_iteration(ck) == 1


def test_report_error_once_per_job(capsys, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    report_error("bad thing")
    assert capsys.readouterr().err == "megaglm-train: error: bad thing\n"
    monkeypatch.setenv("RANK", "3")
    report_error("bad thing", grace_s=0.0)  # printed only if torchrun has not stopped this rank
    assert capsys.readouterr().err == "megaglm-train: error (rank 3 of 4): bad thing\n"


def test_launch_two_ranks_prints_the_message_once(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "HYDRA_FULL_ERROR")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "megaglm.launch.local", "--nproc-per-node", "2", "--",
           f"run.output_dir={tmp_path / 'run'}", *FAST, "parallel.tensor_model_parallel_size=3"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert out.count("world size 2 is not divisible by parallel.tensor_model_parallel_size (3)") == 1, out
    assert "megaglm-launch: rank 0 exited with status 2" in out, out
    assert "Traceback" not in out and "ChildFailedError" not in out, out
