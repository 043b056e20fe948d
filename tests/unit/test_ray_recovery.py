"""The Ray driver's decisions, against a scripted stand-in for Ray (no cluster): which failed rank is
the root cause, when an attempt counts as hung, and the restart loop (backoff, limit, no retry of input
errors)."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

pytest.importorskip("ray")

from megaglm.launch import ray as launcher  # noqa: E402
from megaglm.launch.ray import EXIT_FAILED, EXIT_OK, EXIT_USER_ERROR, Outcome, RayJob  # noqa: E402
from megaglm.launch.ray_placement import RankSlot  # noqa: E402


class Ref:
    """A scripted ObjectRef: ready ``after`` seconds into the test, then gives ``value`` or raises."""

    def __init__(self, value=None, exc=None, after=0.0):
        self.value, self.exc, self.after = value, exc, after


class FakeRay:
    def __init__(self, snapshots=None):
        self.t0 = time.monotonic()
        self.snapshots = snapshots or (lambda t: {})

    def now(self) -> float:
        return time.monotonic() - self.t0

    def wait(self, refs, num_returns=1, timeout=None):
        time.sleep(min(timeout or 0.01, 0.01))
        done = [r for r in refs if r.after <= self.now()]
        return done, [r for r in refs if r not in done]

    def get(self, ref, timeout=None):
        if ref.exc is not None:
            raise ref.exc
        return ref.value


def make_job(fake: FakeRay, world: int = 4, **cfg) -> RayJob:
    job = RayJob.__new__(RayJob)  # no cluster: set what __init__ would
    job.ray, job.world, job.restarts, job.failed_at, job.plan = fake, world, 0, None, None
    job.cfg = SimpleNamespace(**{"poll_interval_s": 0.01, "hang_timeout_s": 5.0, "max_restarts": 3,
                                 "restart_backoff_s": 1.0, "restart_backoff_max_s": 3.0, **cfg})
    job.heartbeats = SimpleNamespace(snapshot=SimpleNamespace(
        remote=lambda attempt: Ref(fake.snapshots(fake.now()))))
    job.sleeps = []
    job.sleep = job.sleeps.append
    return job


def slots(n: int) -> list[RankSlot]:
    return [RankSlot(r, r, 0, r, n, "node", "10.0.0.1") for r in range(n)]


@pytest.fixture(autouse=True)
def short_grace(monkeypatch):
    monkeypatch.setattr(launcher, "FAILURE_GRACE_S", 0.1)


def test_the_dead_rank_is_the_cause_not_its_peers_errors():
    from ray.exceptions import ActorDiedError

    fake = FakeRay()
    gloo = {"status": "error", "message": "Traceback ...\nRuntimeError: [gloo] Connection closed by peer"}
    refs = {Ref(gloo, after=0.0): s for s in slots(4)[:1]}
    refs[Ref(exc=ActorDiedError(), after=0.03)] = slots(4)[1]
    refs.update({Ref(after=1e9): s for s in slots(4)[2:]})  # stuck in a collective with the dead rank
    out = make_job(fake)._watch(0, refs)
    assert (out.kind, out.rank, out.retryable) == ("died", 1, True)
    assert "ActorDiedError" in out.message and "rank 1 on 10.0.0.1: died" in out.headline()


def test_an_input_error_wins_and_is_not_retried():
    fake = FakeRay()
    user = {"status": "user_error", "message": "data.blend[0]: /x.bin does not exist"}
    s = slots(3)
    refs = {Ref(user, after=0.0): s[2], Ref({"status": "error", "message": "boom"}, after=0.0): s[1],
            Ref(user, after=0.02): s[0]}
    out = make_job(fake, world=3)._watch(0, refs)
    assert (out.kind, out.rank, out.retryable) == ("user", 0, False)


def test_no_progress_becomes_a_hang_and_progress_does_not():
    stuck = FakeRay(snapshots=lambda t: {0: (3, "training"), 1: (-1, "setting up")})
    out = make_job(stuck, world=2, hang_timeout_s=0.3)._watch(0, {Ref(after=1e9): s for s in slots(2)})
    assert out.kind == "hang" and out.retryable
    assert "launcher.hang_timeout_s=0.3 s (rank 0: iteration 3, rank 1: setting up)" in out.message

    # Iterations keep coming (one every 0.1 s) for longer than the timeout: not a hang.
    moving = FakeRay(snapshots=lambda t: {0: (int(t * 10), "training")})
    done = {"status": "ok", "iteration": 9, "train_losses": {9: 1.0}}
    out = make_job(moving, world=1, hang_timeout_s=0.3)._watch(0, {Ref(done, after=1.0): slots(1)[0]})
    assert out.kind == "ok" and out.results[0]["iteration"] == 9


def scripted(job: RayJob, outcomes: list[Outcome]) -> list[tuple[int, bool]]:
    calls = []

    def attempt(n, resume):
        calls.append((n, resume))
        return outcomes[len(calls) - 1]

    job._attempt = attempt
    return calls


def test_restarts_back_off_and_resume(capsys):
    job = make_job(FakeRay())
    ok = Outcome("ok", results={0: {"iteration": 8, "train_losses": {8: 2.5}}})
    calls = scripted(job, [Outcome("error", "Traceback\nRuntimeError: timed out", 2, " on 10.0.0.1"),
                           Outcome("died", "lost", 1, " on 10.0.0.2"), Outcome("hang", "no progress"), ok])
    assert job.run() == EXIT_OK
    assert calls == [(0, False), (1, True), (2, True), (3, True)]  # restarts resume from checkpoints
    assert job.sleeps == [1.0, 2.0, 3.0]  # doubling, capped by restart_backoff_max_s
    out = capsys.readouterr()
    assert "restart 1/3 in 1 s after rank 2 on 10.0.0.1: error: RuntimeError: timed out" in out.out
    assert "restart 3/3 in 3 s after hang: no progress" in out.out
    assert "done: 8 iterations, final train loss 2.5000; 3 restart(s)" in out.out
    assert "rank 2 on 10.0.0.1 failed:\nTraceback" in out.err  # the rank's traceback is shown


def test_restarts_run_out(capsys):
    job = make_job(FakeRay(), max_restarts=1)
    scripted(job, [Outcome("died", "lost", 3, " on h"), Outcome("died", "lost again", 3, " on h")])
    assert job.run() == EXIT_FAILED and job.restarts == 1
    assert "error: giving up after 1 restart(s): 1 restart(s) reach launcher.max_restarts=1; last failure: " \
           "rank 3 on h: died: lost again" in capsys.readouterr().err


def test_input_and_placement_errors_stop_at_once(capsys):
    job = make_job(FakeRay())
    calls = scripted(job, [Outcome("user", "train.lr=-1 must be a finite number >= 0", 0, " on h")])
    assert job.run() == EXIT_USER_ERROR and calls == [(0, False)] and job.sleeps == []
    assert "megaglm-ray: error: (rank 0 of 4 on h) train.lr=-1" in capsys.readouterr().err
    job = make_job(FakeRay())
    calls = scripted(job, [Outcome("placement", "could not place the workers ...")])
    assert job.run() == EXIT_FAILED and calls == [(0, False)]


# --------------------------------------------------------------------------------------------------
# the restart budget: a rate, with a backoff that forgets
# --------------------------------------------------------------------------------------------------


def test_budget_is_a_rate_and_the_backoff_resets_after_a_healthy_stretch():
    from megaglm.launch.restart_budget import RestartBudget

    b = RestartBudget(max_restarts=3, window_s=3600, backoff_s=10, backoff_max_s=300, healthy_s=600)
    day = 86400.0
    # four failures days apart: every one restarts (the old lifetime count gave up at the fourth),
    # and each after a long healthy attempt waits the base backoff
    for k in range(4):
        d = b.on_failure(now=k * day + 5000, attempt_started=k * day, healthy=True)
        assert (d.restart, d.backoff_s, d.in_window, d.total) == (True, 10.0, 1, k + 1)
        assert d.reset  # each attempt ran 5000 s > healthy_s and made progress
    # a crash loop: failures right after start, seconds apart -> doubling from the last healthy failure's
    # base wait, then out of budget
    t = 10 * day
    waits = []
    for _ in range(3):
        d = b.on_failure(now=t + 5, attempt_started=t, healthy=False)
        waits.append(d.backoff_s)
        t += 5 + d.backoff_s
    assert waits == [20.0, 40.0, 80.0] and d.in_window == 3
    d = b.on_failure(now=t + 5, attempt_started=t, healthy=False)
    assert not d.restart and d.in_window == 3 and b.total == 7
    # an hour later the window has room again, and the backoff keeps doubling (no healthy attempt)
    d = b.on_failure(now=t + 4000, attempt_started=t + 3990, healthy=False)
    assert d.restart and d.in_window == 1 and d.backoff_s == 160.0


def test_budget_over_the_whole_run_and_bad_settings():
    from megaglm.launch.restart_budget import RestartBudget

    b = RestartBudget(max_restarts=2, window_s=None, backoff_s=1, backoff_max_s=3, healthy_s=1e9)
    assert [b.on_failure(k * 1e6, k * 1e6).restart for k in range(3)] == [True, True, False]
    with pytest.raises(ValueError, match="restart_window_s"):
        RestartBudget(3, window_s=0)


def test_driver_records_every_restart_itself(tmp_path, capsys):
    """The driver writes ray/restarts at the resumed iteration, whether or not the attempt gets as far as
    logging (here no attempt logs anything)."""
    import json

    from megaglm.app.run import plan_run

    out = tmp_path / "run"
    ck = out / "checkpoints"
    (ck / "iter_0000006").mkdir(parents=True)
    (ck / "latest_checkpointed_iteration.txt").write_text("6")
    job = make_job(FakeRay(), world=1, restart_window_s=3600, healthy_interval_s=600)
    job.plan = plan_run([f"run.output_dir={out}", "logging.tensorboard_dir=null"], 1, check_files=False)
    scripted(job, [Outcome("died", "lost", 0, " on h"), Outcome("hang", "stuck"),
                   Outcome("ok", results={0: {"iteration": 8, "train_losses": {}}})])
    assert job.run() == EXIT_OK
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["iteration"], r["ray/restarts"]) for r in recs] == [(6, 1), (6, 2)]
    text = capsys.readouterr().out
    assert "restart 1/3 within 3600 s in 1 s after rank 0 on h: died: lost; resuming from the latest complete " \
           "checkpoint (iteration 6)" in text
