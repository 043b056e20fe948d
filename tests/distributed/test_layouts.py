"""Layout equivalence with real gloo processes: the same global batch from the same initial weights gives
the same losses and the same updated weights at every TP / PP / DP / micro-batch split."""

import pytest
import torch

from tests.distributed.harness import common_overrides, launch, plain_tensors, train_losses

pytestmark = pytest.mark.distributed

# name -> (ranks, overrides). Global batch 8 in every case.
LAYOUTS = {
    "mb4": (1, {"train.micro_batch_size": 2}),  # 4 micro-batches vs the reference's 1
    "tp2": (2, {"parallel.tensor_model_parallel_size": 2, "train.micro_batch_size": 8}),
    "pp2": (2, {"parallel.pipeline_model_parallel_size": 2, "train.micro_batch_size": 2}),
    "dp2_distopt": (2, {"parallel.use_distributed_optimizer": "true", "train.micro_batch_size": 2}),
    "tp2_pp2_sp": (4, {"parallel.tensor_model_parallel_size": 2, "parallel.pipeline_model_parallel_size": 2,
                       "parallel.sequence_parallel": "true", "train.micro_batch_size": 2}),
}


def _final_weights(ckpt_dir):
    from megaglm.training.checkpointing import checkpoint_path, latest_iteration

    state = plain_tensors(checkpoint_path(ckpt_dir, latest_iteration(ckpt_dir)))
    return {k: v for k, v in state.items() if not k.startswith("optimizer")}


@pytest.fixture(scope="module")
def init_and_reference(text_dataset, tmp_path_factory):
    init = tmp_path_factory.mktemp("init")
    launch(1, common_overrides(text_dataset, init, **{"train.train_iters": 0}))
    ref = tmp_path_factory.mktemp("ref")
    launch(1, common_overrides(text_dataset, ref, **{
        "train.micro_batch_size": 8, "checkpoint.load_dir": init / "checkpoints",
        "checkpoint.load_optimizer": "false"}))
    ref_weights = _final_weights(ref / "checkpoints")
    init_weights = _final_weights(init / "checkpoints")
    changed = [k for k in ref_weights if not torch.equal(ref_weights[k], init_weights[k])]
    assert len(changed) > len(ref_weights) // 2  # the two steps really updated the weights
    return init / "checkpoints", train_losses(ref / "metrics.jsonl"), ref_weights, init_weights


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_reference(name, text_dataset, init_and_reference, tmp_path):
    init_ckpt, ref_losses, ref_weights, init_weights = init_and_reference
    ranks, extra = LAYOUTS[name]
    launch(ranks, common_overrides(text_dataset, tmp_path, **{
        **extra, "checkpoint.load_dir": init_ckpt, "checkpoint.load_optimizer": "false"}))
    losses = train_losses(tmp_path / "metrics.jsonl")
    assert sorted(losses) == [1, 2] == sorted(ref_losses)
    for it in (1, 2):
        assert losses[it] == pytest.approx(ref_losses[it], rel=1e-5), (name, it)
    weights = _final_weights(tmp_path / "checkpoints")
    assert set(weights) == set(ref_weights)
    for key, ref in ref_weights.items():
        got = weights[key]
        assert got.shape == ref.shape, key
        # Adam divides by sqrt(v): where a gradient is ~0, reduction-order rounding (another split sums
        # in another order) can move that element's update by a fraction of lr. So the update as a whole
        # must agree to 1e-3 of its norm, and no element may be off by 5% of one step (lr = 1e-3); a
        # shard left un-updated or updated twice is off by a whole step.
        update = (ref - init_weights[key]).norm()
        assert (got - ref).norm() <= 1e-3 * update + 1e-12, (name, key)
        assert (got - ref).abs().max() <= 5e-5, (name, key, (got - ref).abs().max())
    assert len(ref_weights) >= 8
