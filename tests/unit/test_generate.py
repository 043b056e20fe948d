"""Generation (megaglm.inference.generate) against transformers, on one CPU rank.

A random transformers ``GlmForCausalLM`` (vocabulary 1000, padded to 1024 rows in megaglm) is loaded into
megaglm's GPTModel; greedy generation must equal transformers' ``generate(do_sample=False)`` token for
token, with and without the KV cache, batched (prompts of different lengths) and one at a time. Sampling
filters are checked against transformers' own logits processors; padded vocabulary ids are never
produced, and the loss / argmax scoring ignore them (the padded-vocabulary measurements of issue 13).
"""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers_align import all_negative_head, hf_greedy, megatron_from_hf  # noqa: E402
from helpers_convert import glm_config, random_glm  # noqa: E402
from helpers_model import single_rank_megatron  # noqa: E402

transformers = pytest.importorskip("transformers")

from megaglm.inference.generate import SamplingParams, generate, process_logits  # noqa: E402

VOCAB, PADDED = 1000, 1024
STOP = 7
PROMPTS = [[5, 17, 300, 42, 9], [900, 1, 2, 3, 4, 5, 6, 8, 10], [11, 12]]


@pytest.fixture(scope="module")
def models():
    with single_rank_megatron(seed=1234):
        hf = random_glm(glm_config(vocab=VOCAB, max_pos=64), seed=3)
        ours, _ = megatron_from_hf(hf, PADDED)
        yield hf, ours


def test_greedy_equals_transformers_cached_uncached_batched(models):
    hf, ours = models
    new = 14
    want = [hf_greedy(hf, p, new, STOP) for p in PROMPTS]
    params = SamplingParams(max_new_tokens=new, greedy=True, stop_ids=(STOP,))
    batched = generate([ours], PROMPTS, params, VOCAB)
    uncached = generate([ours], PROMPTS, params, VOCAB, use_cache=False)
    single = [generate([ours], [p], params, VOCAB)[0] for p in PROMPTS]
    for i, w in enumerate(want):
        assert batched[i].ids == w, (i, batched[i].ids, w)
        assert uncached[i].ids == w
        assert single[i].ids == w
        assert batched[i].finish_reason == ("stop" if w and w[-1] == STOP else "length")


def test_sampling_batched_equals_single_and_is_seeded(models):
    _, ours = models
    params = SamplingParams(max_new_tokens=8, greedy=False, temperature=0.9, top_k=50, top_p=0.9, seed=5)
    batched = generate([ours], PROMPTS, params, VOCAB)
    for i, p in enumerate(PROMPTS):
        alone = generate([ours], [p], params, VOCAB, prompt_offset=i)[0]
        assert alone.ids == batched[i].ids
    again = generate([ours], PROMPTS, params, VOCAB, use_cache=False)
    assert [g.ids for g in again] == [g.ids for g in batched]
    other = generate([ours], PROMPTS, SamplingParams(**{**params.__dict__, "seed": 6}), VOCAB)
    assert [g.ids for g in other] != [g.ids for g in batched]


def test_logit_filters_match_transformers_processors():
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    torch.manual_seed(0)
    logits = torch.randn(4, 300) * 3
    for t, k, p in [(0.7, 0, 1.0), (1.0, 20, 1.0), (1.3, 0, 0.8), (0.5, 40, 0.6), (1.0, 1, 0.3)]:
        ours = process_logits(logits, SamplingParams(greedy=False, temperature=t, top_k=k, top_p=p))
        ref = TemperatureLogitsWarper(t)(None, logits.clone())
        if k:
            ref = TopKLogitsWarper(k)(None, ref)
        if p < 1:
            ref = TopPLogitsWarper(p)(None, ref)
        assert torch.equal(torch.isinf(ours), torch.isinf(ref)), (t, k, p)
        assert torch.allclose(ours[~torch.isinf(ours)], ref[~torch.isinf(ref)], atol=1e-6)


def test_bad_sampling_parameters_are_refused():
    for bad, msg in [({"max_new_tokens": 0}, "max_new_tokens"), ({"greedy": False, "temperature": 0.0}, "temperature"),
                     ({"greedy": False, "top_p": 0.0}, "top_p"), ({"greedy": False, "top_k": -1}, "top_k")]:
        with pytest.raises(ValueError, match=msg):
            SamplingParams(**bad).check()


def test_padded_vocab_loss_and_argmax_match_transformers(models):
    """The padded preset case of issue 13: vocabulary 1000 in 1024 rows (24 zero rows). Per-token loss
    equals transformers' to 1e-5 and, for a head whose real logits are all negative, the argmax (model
    logits, evaluation scoring, greedy generation) is transformers' and never a padded id."""
    from megaglm.eval.logits import pipeline_logits, pipeline_token_losses

    hf, _ = models
    hf = random_glm(glm_config(vocab=VOCAB, max_pos=64), seed=4)
    torch.manual_seed(1)
    tokens = torch.randint(0, VOCAB, (2, 24))
    labels = torch.roll(tokens, -1, 1)
    all_negative_head(hf, tokens)
    with torch.no_grad():
        ref_logits = hf(input_ids=tokens).logits
    assert ref_logits.max() < 0  # every real logit negative: a zero padded row would win every argmax
    ref_loss = torch.nn.functional.cross_entropy(ref_logits.reshape(-1, VOCAB), labels.reshape(-1),
                                                 reduction="none").reshape(labels.shape)
    with single_rank_megatron(seed=1234):
        ours, _ = megatron_from_hf(hf, PADDED)
        loss = pipeline_token_losses([ours], tokens, labels)
        loss2, correct = pipeline_token_losses([ours], tokens, ref_logits.argmax(-1), with_argmax=True)
        logits = pipeline_logits([ours], tokens)
        gen = generate([ours], [tokens[0, :6].tolist()], SamplingParams(max_new_tokens=6, stop_ids=(STOP,)), VOCAB)
        unmasked, _ = megatron_from_hf(hf, PADDED, real_vocab_size=PADDED)
        loss_unmasked = pipeline_token_losses([unmasked], tokens, labels)
    assert (loss - ref_loss).abs().max() < 1e-5
    ref_top = -torch.log_softmax(ref_logits, -1).max(-1).values  # the loss of the argmax token
    assert (loss2 - ref_top).abs().max() < 1e-5
    assert bool(correct.all()), f"argmax scoring {int(correct.sum())}/{correct.numel()}"
    assert int(logits.argmax(-1).max()) < VOCAB and torch.equal(logits.argmax(-1), ref_logits.argmax(-1))
    assert max(gen[0].ids) < VOCAB
    assert gen[0].ids == hf_greedy(hf, tokens[0, :6].tolist(), 6, STOP)
    # the same model without the mask is measurably off (the measurement): zero rows count
    assert (loss_unmasked - ref_loss).abs().max() > 1e-3
