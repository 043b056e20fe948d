"""The run's batches: training and validation micro-batch iterators for pretraining windows
(megatron's ``GPTDataset`` / ``BlendedDataset``), LongAlign chat SFT (:mod:`megaglm.data.sft`) and
preference pairs for DPO / reward models (:mod:`megaglm.data.preference`).

Both formats share the iteration contract of :mod:`megaglm.data.batching`: the whole iterator state is
the number of samples consumed, so a resumed run sees the batches an uninterrupted one would.

Validation (``train.eval_batches``): ``fixed`` (the default) measures the same ``train.eval_iters``
global batches of the validation split at every evaluation, so successive validation losses differ
only by what the model learned; ``advance`` consumes new validation samples at each evaluation
(Megatron-LM's behaviour), resumable through the checkpoint's ``consumed_valid_samples``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Optional

from megaglm.training.build import Run
from megaglm.training.errors import RunStopped

log = logging.getLogger(__name__)

__all__ = ["Batches", "build_batches", "EVAL_BATCHES"]

EVAL_BATCHES = ("fixed", "advance")


@dataclass
class Batches:
    """This rank's data for a run.

    Attributes:
        train: one training iterator per model chunk (megatron's interleaved schedule takes a list).
        valid_dataset: the validation dataset, or None when the split is empty.
        make_iterator: ``(dataset, consumed_samples) -> iterator`` for this rank.
        unigram_entropy: the training blend's unigram entropy in nats/token (pretraining, rank 0), the
            loss of the best context-free model: a yardstick for the validation loss.
    """

    train: list
    valid_dataset: Any
    make_iterator: Callable[[Any, int], Any]
    unigram_entropy: Optional[float] = None

    @property
    def consumed_samples(self) -> int:
        """Global samples the training iterators have consumed."""
        return self.train[0].consumed_samples

    @property
    def step_seq_length(self) -> Optional[int]:
        """This step's row length when it varies (SFT sorted / naive batching), else None."""
        return getattr(self.train[0], "step_seq_length", None)

    def train_iterator(self):
        """What megatron's ``forward_backward_func`` takes as ``data_iterator``."""
        return self.train[0] if len(self.train) == 1 else self.train

    def valid_iterator(self, consumed: int):
        """Validation iterators starting at ``consumed`` samples (None without a validation split)."""
        if self.valid_dataset is None:
            return None
        its = [self.make_iterator(self.valid_dataset, consumed) for _ in self.train]
        return its[0] if len(its) == 1 else its


def _pretrain_data(run: Run, plan, consumed_train: int):
    from megaglm.data.batching import MicroBatchIterator
    from megaglm.data.glm_objective import wrap_datasets
    from megaglm.data.pretrain import build_pretrain_datasets

    t, G = plan.config.train, plan.batch.global_batch_size
    evals = int(t.train_iters) // max(int(t.eval_interval), 1) + 1 if t.eval_batches == "advance" else 1
    samples = (int(t.train_iters) * G, evals * int(t.eval_iters) * G, int(t.eval_iters) * G)
    try:
        train_ds, valid_ds, _ = build_pretrain_datasets(plan.config.data, run.tokenizer, plan.batch.seq_length,
                                                        int(t.seed), samples)
    except AssertionError as err:  # megatron-core's dataset builder asserts on settings a user chose
        raise RunStopped(f"megatron-core's dataset builder refused data.blend={list(plan.config.data.blend)} / "
                         f"data.split={plan.config.data.split!r}: {' '.join(str(err).split())[:300]}") from err
    # data.objective=glm: blank infilling over the same windows (megaglm/data/glm_objective.py)
    train_ds, valid_ds = wrap_datasets(plan.config.data, plan.config.model.position_embedding_type, run.tokenizer,
                                       plan.batch.seq_length, int(t.seed), train_ds, valid_ds)

    def make_iterator(ds, consumed: int):
        return MicroBatchIterator(ds, plan.batch.micro_batch_size, G, run.dp_rank, run.dp_size, consumed)

    return train_ds, valid_ds, make_iterator


def _chat_data(run: Run, plan, log_text: Callable[[str], None]):
    from megaglm.data.sft import build_sft_data
    from megaglm.data.sft_demo import chat_blend

    sft = build_sft_data(plan.config, run.tokenizer, run.dp_rank, run.dp_size, log=log_text,
                         demo_prefixes=chat_blend(plan.config.data, run.tokenizer))
    return sft.train, sft.valid, sft.make_iterator


def _preference_data(run: Run, plan, log_text: Callable[[str], None]):
    from megaglm.data.preference import build_preference_data
    from megaglm.training.alignment import precompute_reference

    t = plan.config.train
    mode = "reward" if str(t.objective) == "reward" else "dpo"
    pref = build_preference_data(plan.config, run.tokenizer, run.dp_rank, run.dp_size, mode=mode, log=log_text)
    if mode == "dpo" and str(t.dpo.reference) == "precomputed":
        precompute_reference(run, pref, log_text)  # DPO: reference log-probs scored once, stored with the data
    return pref.train, pref.valid, pref.make_iterator


def _unigram_entropy(plan, tokenizer) -> float:
    from megaglm.data.demo import ensure_demo_dataset
    from megaglm.data.pretrain import parse_blend
    from megaglm.data.stats import blend_unigram_entropy

    data = plan.config.data
    if len(data.blend) == 0:
        return blend_unigram_entropy([ensure_demo_dataset(data.cache_dir, tokenizer, use_barrier=False)])
    prefixes, weights = parse_blend(list(data.blend))
    return blend_unigram_entropy(prefixes, weights)


def build_batches(run: Run, consumed_train: int, log_text: Callable[[str], None] = log.info) -> Batches:
    """The training and validation data of ``run`` (collective: every rank calls it), the training
    iterators positioned at ``consumed_train`` samples (``train.micro_batch_size``,
    ``train.global_batch_size`` and ``train.seq_length`` from the plan's batch arithmetic).

    Raises:
        ValueError: bad data settings or files (the message names the key or file).
    """
    plan = run.plan
    if plan.data_format == "chat":
        train_ds, valid_ds, make_iterator = _chat_data(run, plan, log_text)
    elif plan.data_format == "preference":
        train_ds, valid_ds, make_iterator = _preference_data(run, plan, log_text)
    else:
        train_ds, valid_ds, make_iterator = _pretrain_data(run, plan, consumed_train)
    train = [make_iterator(train_ds, consumed_train) for _ in run.model]
    entropy = None
    if run.is_logging_rank and plan.data_format == "pretrain":
        entropy = _unigram_entropy(plan, run.tokenizer)
    if valid_ds is None and int(plan.config.train.eval_interval) > 0:
        log_text(f"WARNING: train.eval_interval={plan.config.train.eval_interval} but data.split="
                 f"{plan.config.data.split!r} leaves no validation data: no validation will run (give the "
                 "validation split a share, or set train.eval_interval=0)")
    return Batches(train, valid_ds, make_iterator, entropy)
