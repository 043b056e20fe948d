"""megaglm.parallel.layout.validate_layout: each bad layout fails with a message naming its config key."""

import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers_model import load_model_preset  # noqa: E402

from megaglm.config import ParallelConfig, TrainConfig  # noqa: E402
from megaglm.parallel.layout import Layout, validate_layout  # noqa: E402


@pytest.fixture(scope="module")
def glm9b():
    return load_model_preset("glm4_9b")  # 40 layers, 32 heads, 2 KV groups, ffn 13696


def P(**kw):
    return ParallelConfig(**kw)


def T(**kw):
    base = dict(micro_batch_size=1, global_batch_size=64, seq_length=8192)
    base.update(kw)
    return TrainConfig(**base)


def test_good_layout_derives_dp(glm9b):
    lay = validate_layout(glm9b, P(tensor_model_parallel_size=2, pipeline_model_parallel_size=4,
                                   context_parallel_size=2, sequence_parallel=True), 64, T())
    assert lay == Layout(tp=2, pp=4, vpp=None, cp=2, dp=4, sp=True, world=64, seq_multiple=4)  # lcm(2 CP, CP TP)
    assert lay.model_parallel_size == 16


def test_world_not_divisible_shows_arithmetic(glm9b):
    with pytest.raises(ValueError) as e:
        validate_layout(glm9b, P(tensor_model_parallel_size=2, pipeline_model_parallel_size=2), 6)
    msg = str(e.value)
    assert "parallel.tensor_model_parallel_size (2) x parallel.pipeline_model_parallel_size (2)" in msg
    assert "= 4" in msg and "world size 6" in msg


def test_tp_must_divide_heads(glm9b):
    with pytest.raises(ValueError, match=r"parallel.tensor_model_parallel_size=3 .*model.num_attention_heads=32"):
        validate_layout(glm9b, P(tensor_model_parallel_size=3), 3)


def test_tp_vs_kv_groups(glm9b):
    # 2 KV groups: TP 1, 2 divide them; TP 4, 8, 16, 32 are multiples (megatron replicates KV heads).
    for tp in (1, 2, 4, 8):
        assert validate_layout(glm9b, P(tensor_model_parallel_size=tp), tp).tp == tp
    m = load_model_preset("glm4_9b")
    m.num_attention_heads, m.num_query_groups, m.kv_channels = 12, 4, 128  # TP 6: divides 12, not 4
    m.ffn_hidden_size = 12 * 128
    with pytest.raises(ValueError, match=r"neither a divisor nor a multiple of model.num_query_groups=4"):
        validate_layout(m, P(tensor_model_parallel_size=6), 6)


def test_tp_must_divide_ffn(glm9b):
    m = load_model_preset("glm4_9b")
    m.ffn_hidden_size = 13698
    with pytest.raises(ValueError, match=r"model.ffn_hidden_size=13698"):
        validate_layout(m, P(tensor_model_parallel_size=4), 4)


def test_pp_must_divide_layers(glm9b):
    with pytest.raises(ValueError, match=r"model.num_layers=40 .*parallel.pipeline_model_parallel_size=3"):
        validate_layout(glm9b, P(pipeline_model_parallel_size=3), 3)


def test_vpp_rules(glm9b):
    lay = validate_layout(glm9b, P(pipeline_model_parallel_size=4, virtual_pipeline_model_parallel_size=5), 4,
                          T(global_batch_size=8))
    assert (lay.pp, lay.vpp) == (4, 5)
    with pytest.raises(ValueError, match=re.escape("model.num_layers=40 is not divisible by parallel."
                                                   "pipeline_model_parallel_size (4) x parallel."
                                                   "virtual_pipeline_model_parallel_size (3) = 12")):
        validate_layout(glm9b, P(pipeline_model_parallel_size=4, virtual_pipeline_model_parallel_size=3), 4)
    with pytest.raises(ValueError, match=r"parallel.virtual_pipeline_model_parallel_size=2 needs"):
        validate_layout(glm9b, P(virtual_pipeline_model_parallel_size=2), 1)
    with pytest.raises(ValueError, match=r"multiple of parallel.pipeline_model_parallel_size=4"):
        validate_layout(glm9b, P(pipeline_model_parallel_size=4, virtual_pipeline_model_parallel_size=5), 4,
                        T(global_batch_size=6))
    # vpp=1 is no interleaving
    assert validate_layout(glm9b, P(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=1),
                           2).vpp is None


def test_sequence_parallel_off_at_tp1(glm9b):
    with pytest.warns(UserWarning, match="parallel.sequence_parallel"):
        lay = validate_layout(glm9b, P(sequence_parallel=True), 2)
    assert lay.sp is False and lay.dp == 2


def test_sequence_parallel_needs_even_split(glm9b):
    with pytest.raises(ValueError, match=r"parallel.sequence_parallel=true: train.seq_length=8190"):
        validate_layout(glm9b, P(tensor_model_parallel_size=4, sequence_parallel=True), 4, T(seq_length=8190))


def test_global_batch_divisibility(glm9b):
    with pytest.raises(ValueError) as e:
        validate_layout(glm9b, P(tensor_model_parallel_size=2), 6, T(micro_batch_size=2, global_batch_size=10))
    msg = str(e.value)
    assert "train.global_batch_size=10" in msg and "train.micro_batch_size (2)" in msg and "= 6" in msg


def test_context_parallel_seq_split(glm9b):
    with pytest.raises(ValueError, match=re.escape("train.seq_length=8190 is not divisible by 2 x "
                                                   "parallel.context_parallel_size (2) = 4")):
        validate_layout(glm9b, P(context_parallel_size=2), 2, T(seq_length=8190))
    assert validate_layout(glm9b, P(context_parallel_size=2), 2, T(seq_length=8192)).cp == 2


def test_long_train_seq_warns(glm9b):
    with pytest.warns(UserWarning, match=r"train.seq_length=16384 exceeds model.max_position_embeddings=8192"):
        validate_layout(glm9b, P(), 1, T(seq_length=16384))


def test_bad_sizes(glm9b):
    with pytest.raises(ValueError, match="parallel.context_parallel_size=0"):
        validate_layout(glm9b, P(context_parallel_size=0), 1)
    with pytest.raises(ValueError, match="world size"):
        validate_layout(glm9b, P(), 0)
