"""THUDM chatglm-6b (first generation) checkpoints through ``megaglm-ckpt`` end to end, in one process:
a gen-1 directory built by the test (random tensors, THUDM's names and config) -> megaglm checkpoint ->
gen-1 directory again is bit-exact (tensors and config.json), and the converted megaglm model computes
the logits of the THUDM-convention reference equations (tests/glm_reference.py) on a GLM batch."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers_convert import read_safetensors_dir, save_thudm  # noqa: E402

from tests.glm_reference import reference_logits, weights_from_thudm_gen1  # noqa: E402

CONFIG = {"architectures": ["ChatGLMModel"], "model_type": "chatglm", "hidden_size": 64, "inner_hidden_size": 256,
          "num_attention_heads": 4, "num_layers": 2, "vocab_size": 256, "max_sequence_length": 128,
          "layernorm_epsilon": 1e-5, "position_encoding_2d": True, "torch_dtype": "float32", "bos_token_id": 250,
          "eos_token_id": 251, "mask_token_id": 252, "gmask_token_id": 253, "pad_token_id": 3, "use_cache": True,
          "auto_map": {"AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration"}}


def _gen1_state(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    h, f, v = CONFIG["hidden_size"], CONFIG["inner_hidden_size"], CONFIG["vocab_size"]

    def r(*shape, base=0.0, scale=0.05):
        return base + scale * torch.randn(*shape, generator=g)

    out = {"transformer.word_embeddings.weight": r(v, h), "lm_head.weight": r(v, h),
           "transformer.final_layernorm.weight": r(h, base=1.0), "transformer.final_layernorm.bias": r(h)}
    for i in range(CONFIG["num_layers"]):
        p = f"transformer.layers.{i}."
        out.update({p + "input_layernorm.weight": r(h, base=1.0), p + "input_layernorm.bias": r(h),
                    p + "attention.query_key_value.weight": r(3 * h, h), p + "attention.query_key_value.bias": r(3 * h),
                    p + "attention.dense.weight": r(h, h), p + "attention.dense.bias": r(h),
                    p + "post_attention_layernorm.weight": r(h, base=1.0), p + "post_attention_layernorm.bias": r(h),
                    p + "mlp.dense_h_to_4h.weight": r(f, h), p + "mlp.dense_h_to_4h.bias": r(f),
                    p + "mlp.dense_4h_to_h.weight": r(h, f), p + "mlp.dense_4h_to_h.bias": r(h),
                    p + "attention.rotary_emb.inv_freq": torch.ones(4)})  # a buffer: ignored
    return out


@pytest.fixture(scope="module")
def world():
    import torch.distributed as dist

    from megaglm.convert.common import cpu_ranks
    from megaglm.parallel.init import find_free_port

    own = not dist.is_initialized()
    if own:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{find_free_port()}", rank=0, world_size=1)
    with cpu_ranks():
        yield
    if own:
        dist.destroy_process_group()


def test_gen1_round_trip_and_logits(world, tmp_path):
    from megatron.core import parallel_state as ps

    from megaglm.config import ParallelConfig, PrecisionConfig
    from megaglm.convert.common import model_config_from_dict, read_checkpoint_meta, resolve_checkpoint
    from megaglm.convert.hf_to_megaglm import hf_to_megaglm
    from megaglm.convert.megaglm_to_hf import megaglm_to_hf
    from megaglm.models.glm.builder import build_model
    from megaglm.parallel.init import init_model_parallel
    from megaglm.training.checkpointing import load_checkpoint

    state = _gen1_state()
    src = save_thudm(state, CONFIG, tmp_path / "chatglm6b")
    res = hf_to_megaglm(src, tmp_path / "m", launcher="current")
    assert res.model["position_embedding_type"] == "rope_2d" and res.model["norm_placement"] == "post"
    megaglm_to_hf(res.output, tmp_path / "back", "chatglm_6b")
    back = read_safetensors_dir(tmp_path / "back")
    weights = {k: v for k, v in state.items() if "inv_freq" not in k}
    assert set(back) == set(weights) and all(torch.equal(back[k], weights[k]) for k in weights)
    assert json.loads((tmp_path / "back" / "config.json").read_text()) == CONFIG

    meta = read_checkpoint_meta(resolve_checkpoint(res.output))
    mc = model_config_from_dict(meta["model"])
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    init_model_parallel(ParallelConfig(), 0)
    model = build_model(mc, ParallelConfig(), PrecisionConfig(), mc.padded_vocab_size)
    load_checkpoint(str(res.output), [model], None, None, model_config=meta["model"], load_optimizer=False)
    model.eval()
    tokens = torch.randint(0, 250, (1, 20), generator=torch.Generator().manual_seed(1))
    pos1 = torch.tensor([list(range(12)) + [11] * 8])  # ChatGLM-6B's prompt [gMASK] <sop> answer layout
    pos2 = torch.tensor([[0] * 12 + list(range(1, 9))])
    prefix = torch.tensor([12])
    with torch.no_grad():
        got = model(tokens, torch.stack([pos1, pos2], 1), prefix).double()
    want = reference_logits(weights_from_thudm_gen1(state, 2, 4), tokens, pos1, pos2, prefix, kind="rope_2d", rot=16,
                            base=10000.0, alpha=math.sqrt(4), eps=1e-5, gated=False, pairing="rotate_half")
    assert (got - want).abs().max() < 1e-5
