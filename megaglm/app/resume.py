"""Resume policy: what happens to every setting that differs between a run and the checkpoint it resumes
from. Nothing changes silently and nothing fails with a library traceback.

Every checkpoint carries the resolved config of the run that wrote it (``run_config.yaml``). Before
anything is built, :func:`resume_decisions` compares it with the new run's config key by key and puts each
difference in one of three classes:

* **continues as asked** (:data:`CONTINUE`): the new value applies (more iterations, another layout --
  weights and optimizer state are resharded on load --, other logging, a new batch size -- the data
  position is the number of samples consumed, in the new run's data order --, RoPE base changes for a
  context extension ...). Reported in one line.
* **continues with the checkpoint's value** (:data:`CHECKPOINT`): megatron-core restores it from the
  checkpoint. The LR schedule (``train.lr``, ``min_lr``, ``lr_warmup_iters``, ``lr_decay_style``,
  ``lr_decay_iters``, ``weight_decay``, and the decay length that ``train.train_iters`` sets when
  ``lr_decay_iters`` is null) comes from the checkpoint unless ``checkpoint.override_scheduler=true``
  (Megatron-LM's ``--override-opt-param-scheduler``; its default is ``--use-checkpoint-opt_param-scheduler``);
  Adam's betas and epsilon live in the optimizer state (torch's ``Optimizer.load_state_dict``) unless
  ``checkpoint.load_optimizer=false``; so does fp16's current loss scale (``precision.initial_loss_scale``
  only starts a new run). Reported in one line with the way to override.
* **refused** (:data:`REFUSE`): the checkpoint cannot continue this run: another architecture, another
  tokenizer, another parameter dtype, optimizer-state format (distributed optimizer on / off) or data
  format with the optimizer state. One line naming the keys and
  the way out (``checkpoint.load_optimizer=false`` for the weights only, a new ``run.output_dir``, or the
  checkpoint's value).

With ``checkpoint.load_optimizer=false`` (weights only: fresh optimizer, schedule and data position) only
the architecture and tokenizer matter.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from megaglm.config import LOSS_SCALE_KEYS

__all__ = ["CONTINUE", "CHECKPOINT", "REFUSE", "Decision", "ResumeReport", "classify", "resume_decisions",
           "flatten", "saved_config"]

CONTINUE, CHECKPOINT, REFUSE = "continue", "checkpoint", "refuse"

# architecture: the checkpoint's tensors would not fit, or would mean something else
_ARCHITECTURE = {"model." + k for k in (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "kv_channels",
    "add_qkv_bias", "add_bias_linear", "untie_embeddings_and_output_weights", "rotary_percent",
    "rotary_interleaved", "padded_vocab_size", "make_vocab_size_divisible_by")}
# megatron-core's OptimizerParamScheduler.load_state_dict takes these from the checkpoint
_SCHEDULE = {"train." + k for k in ("lr", "min_lr", "lr_warmup_iters", "lr_decay_style", "lr_decay_iters",
                                     "weight_decay")}
# torch's Optimizer.load_state_dict restores the param groups' hyperparameters
_OPTIMIZER_STATE = {"train.adam_beta1", "train.adam_beta2", "train.adam_eps"}
# keys of a staged run that the stage chain itself sets per stage
_STAGE_RUNNER = {"stage.parent_checkpoint"}
# fp16's loss scaler: the scale itself continues from the checkpoint (megatron saves the scaler's state);
# the other knobs apply as asked. Ignored unless the run is fp16.
_LOSS_SCALE = {"precision." + k for k in LOSS_SCALE_KEYS}


@dataclass(frozen=True)
class Decision:
    """One differing setting: ``key``, the checkpoint's and the run's values, the class, and a note."""

    key: str
    saved: Any
    current: Any
    outcome: str
    note: str = ""

    def describe(self) -> str:
        text = f"{self.key} {_short(self.saved)} -> {_short(self.current)}"
        return f"{text} ({self.note})" if self.note else text


@dataclass(frozen=True)
class ResumeReport:
    """The decisions for one resume, and the lines to print (``lines``: one per class present)."""

    checkpoint: str
    decisions: tuple[Decision, ...] = field(default=())

    def of(self, outcome: str) -> list[Decision]:
        return [d for d in self.decisions if d.outcome == outcome]

    @property
    def refused(self) -> bool:
        return bool(self.of(REFUSE))

    def lines(self) -> list[str]:
        out = []
        cont, ckpt = self.of(CONTINUE), self.of(CHECKPOINT)
        if cont:
            out.append(f"resume from {self.checkpoint}: continuing with changed settings as asked: "
                       + "; ".join(d.describe() for d in cont))
        if ckpt:
            ways = sorted({_way_out(d.key) for d in ckpt})
            out.append(f"resume from {self.checkpoint}: the checkpoint's values are kept for "
                       + "; ".join(f"{d.key} (checkpoint {_short(d.saved)}, asked {_short(d.current)})" for d in ckpt)
                       + f" -- to use the new values set {' or '.join(ways)}")
        return out

    def refusal(self) -> str:
        """The one-line message of a refused resume."""
        bad = self.of(REFUSE)
        keys = "; ".join(d.describe() for d in bad)
        fixes = sorted({d.note for d in bad if d.note})
        return (f"checkpoint {self.checkpoint} cannot continue this run: {keys}. "
                + " / ".join(fixes))


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _way_out(key: str) -> str:
    if key in _OPTIMIZER_STATE:
        return "checkpoint.load_optimizer=false (a fresh optimizer)"
    return "checkpoint.override_scheduler=true"


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"train.lr": 0.003, ...}`` for a nested dict (lists are leaves)."""
    out: dict[str, Any] = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    out[prefix[:-1]] = tree
    return out


def classify(key: str, saved: Any, current: Any, load_optimizer: bool, override_scheduler: bool,
             decay_iters_set: bool = True) -> Decision:
    """The class of one differing setting (see the module docstring).

    Args:
        key: the dotted config key (``train.lr``).
        saved / current: the checkpoint's and the run's values.
        load_optimizer: ``checkpoint.load_optimizer`` of the run (False: weights only).
        override_scheduler: ``checkpoint.override_scheduler`` of the run.
        decay_iters_set: whether ``train.lr_decay_iters`` is set in both configs (when it is null,
            ``train.train_iters`` is the decay length, which the schedule then takes from the checkpoint).
    """
    d = lambda outcome, note="": Decision(key, saved, current, outcome, note)  # noqa: E731
    if key in _ARCHITECTURE:
        return d(REFUSE, "pick the checkpoint's model preset / value, or a new run.output_dir for a new run")
    if key.startswith("data.tokenizer."):
        return d(REFUSE, "the embeddings index the checkpoint's vocabulary: use its tokenizer (data.tokenizer.*), "
                         "or a new run.output_dir")
    if not load_optimizer:
        return d(CONTINUE, "weights only: fresh optimizer, schedule and data position")
    if key == "precision.params_dtype":
        return d(REFUSE, "the optimizer state was saved for the checkpoint's dtype: set "
                         "checkpoint.load_optimizer=false to start a fresh optimizer from these weights, or keep "
                         f"precision.params_dtype={saved}")
    if key == "parallel.use_distributed_optimizer":
        return d(REFUSE, "the optimizer state's format differs with and without the distributed optimizer: set "
                         "checkpoint.load_optimizer=false to start a fresh optimizer from these weights, or keep "
                         f"parallel.use_distributed_optimizer={saved}")
    if key == "data.format":
        return d(REFUSE, "the data position of another data format means nothing here: set "
                         "checkpoint.load_optimizer=false to fine-tune from these weights")
    if key in _SCHEDULE:
        return d(CONTINUE if override_scheduler else CHECKPOINT, "checkpoint.override_scheduler=true"
                 if override_scheduler else "")
    if key == "train.train_iters":
        if decay_iters_set or override_scheduler:
            return d(CONTINUE, "the run stops at the new count")
        return d(CONTINUE, "the run stops at the new count; the LR decay length stays the checkpoint's "
                           "(set checkpoint.override_scheduler=true to decay over the new count)")
    if key in _OPTIMIZER_STATE or key == "precision.initial_loss_scale":
        return d(CHECKPOINT)
    if key in ("train.global_batch_size", "train.seq_length") or key.startswith("data."):
        return d(CONTINUE, "the data position carries over as the number of samples consumed, in this run's "
                           "data order")
    if key == "train.seed":
        return d(CONTINUE, "the data order follows the new seed; the RNG states come from the checkpoint")
    if key.startswith("parallel."):
        return d(CONTINUE, "weights and optimizer state are resharded on load; per-rank RNG states are not "
                           "restored when the layout changes")
    return d(CONTINUE)


def resume_decisions(saved_config: dict, current_config: dict, checkpoint: str) -> ResumeReport:
    """Compare a checkpoint's saved run config with the run's (both resolved, nested dicts).

    Keys present on one side only (a setting added or removed between versions) are compared with None.
    The run's own bookkeeping keys of a stage chain (``stage.parent_checkpoint``) are ignored, and so are
    the fp16 loss-scaler keys (``precision.loss_scale`` ...) unless the run is fp16.

    Returns:
        The :class:`ResumeReport` (``refused`` when any difference is refused).
    """
    from megaglm.config import upgrade_model_dict

    saved = dict(saved_config)
    saved["model"] = upgrade_model_dict(saved.get("model") or {})
    a, b = flatten(saved), flatten(current_config)
    ck = current_config.get("checkpoint") or {}
    load_optimizer = bool(ck.get("load_optimizer", True))
    override = bool(ck.get("override_scheduler", False))
    decay_set = a.get("train.lr_decay_iters") is not None and b.get("train.lr_decay_iters") is not None
    decisions = []
    for key in sorted(set(a) | set(b)):
        if key in _STAGE_RUNNER or (key in _LOSS_SCALE and b.get("precision.params_dtype") != "fp16"):
            continue
        va, vb = a.get(key), b.get(key)
        if _same(va, vb):
            continue
        decisions.append(classify(key, va, vb, load_optimizer, override, decay_set))
    return ResumeReport(checkpoint, tuple(decisions))


def _same(x: Any, y: Any) -> bool:
    if isinstance(x, (int, float)) and isinstance(y, (int, float)) and not isinstance(x, bool) \
            and not isinstance(y, bool):
        return float(x) == float(y)
    return x == y


def saved_config(ckpt_dir: str) -> Optional[dict]:
    """The resolved run config saved with a checkpoint (``run_config.yaml``), or None when it has none."""
    from pathlib import Path

    import yaml

    from megaglm.training.checkpointing import CONFIG_FILE

    f = Path(ckpt_dir) / CONFIG_FILE
    if not f.is_file():
        return None
    data = yaml.safe_load(f.read_text())
    return data if isinstance(data, dict) else None

