"""Stop and resume: the loss curve continues identically (bitwise on CPU); a checkpoint saved at TP2
loads at TP1 and at PP2 with the same logits, and training continues across the layout change."""

import pytest
import torch

from tests.distributed.harness import common_overrides, launch, plain_tensors, train_losses

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("layout_name,layout_overrides", [
    ("tp2", {"parallel.tensor_model_parallel_size": 2}),
    # the distributed optimizer over torch AdamW needs megaglm's bridges in checkpointing.py
    # (extended: the optimizer's state at a changed layout is checked by test_resume_changes / test_convert_layouts)
    pytest.param("dp2_distopt", {"parallel.use_distributed_optimizer": "true"}, marks=pytest.mark.extended),
])
def test_stop_and_resume_is_bitwise(layout_name, layout_overrides, text_dataset, tmp_path):
    layout = {**layout_overrides, "train.train_iters": 6, "checkpoint.save_interval": 3}
    full, split = tmp_path / "full", tmp_path / "split"
    launch(2, common_overrides(text_dataset, full, **layout))
    first = launch(2, common_overrides(text_dataset, split, **layout, **{"train.exit_after_iters": 3}))
    assert "saved checkpoint" in first.stdout
    assert sorted(train_losses(split / "metrics.jsonl")) == [1, 2, 3]
    second = launch(2, common_overrides(text_dataset, split, **layout))
    assert "loaded" in second.stdout and "iteration 3" in second.stdout
    want, got = train_losses(full / "metrics.jsonl"), train_losses(split / "metrics.jsonl")
    assert sorted(want) == sorted(got) == [1, 2, 3, 4, 5, 6]
    assert [got[i] for i in range(1, 7)] == [want[i] for i in range(1, 7)]  # bitwise
    assert want[6] < want[1]

    a = plain_tensors(full / "checkpoints" / "iter_0000006")
    b = plain_tensors(split / "checkpoints" / "iter_0000006")
    assert set(a) == set(b) and len(a) > 10
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_save_tp2_load_tp1_and_pp2_same_logits(text_dataset, tmp_path):
    src = tmp_path / "tp2"
    launch(2, common_overrides(text_dataset, src, **{"parallel.tensor_model_parallel_size": 2}))
    ckpt = src / "checkpoints"
    logits = {}
    for name, ranks, extra in [("tp2", 2, {"parallel.tensor_model_parallel_size": 2}),
                               ("tp1", 1, {}),
                               ("pp2", 2, {"parallel.pipeline_model_parallel_size": 2})]:
        out = tmp_path / f"logits_{name}.pt"
        launch(ranks, common_overrides(text_dataset, tmp_path / name, **extra,
                                       **{"checkpoint.load_dir": ckpt}),
               module="tests.distributed.probe_logits", env={"PROBE_OUT": str(out)})
        logits[name] = torch.load(out)
    assert logits["tp2"].shape[:2] == (2, 48)
    torch.testing.assert_close(logits["tp1"], logits["tp2"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits["pp2"], logits["tp2"], rtol=1e-5, atol=1e-5)

    # Training continues across the layout change (optimizer state resharded): iteration 3 at TP1
    # from the TP2 checkpoint matches iteration 3 of the TP2 run continued.
    cont = {"train.train_iters": 3, "checkpoint.load_dir": ckpt}
    launch(2, common_overrides(text_dataset, tmp_path / "tp2_cont", **cont,
                               **{"parallel.tensor_model_parallel_size": 2}))
    moved = launch(1, common_overrides(text_dataset, tmp_path / "tp1_cont", **cont))
    assert "layout changed" in moved.stdout
    l_tp2 = train_losses(tmp_path / "tp2_cont" / "metrics.jsonl")
    l_tp1 = train_losses(tmp_path / "tp1_cont" / "metrics.jsonl")
    assert sorted(l_tp1) == sorted(l_tp2) == [3]
    assert l_tp1[3] == pytest.approx(l_tp2[3], rel=1e-5)
