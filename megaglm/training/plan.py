"""The resolved run plan: everything a run needs, checked once, frozen.

:func:`megaglm.app.preflight.preflight` builds a :class:`RunPlan` from a composed config (and the
launcher's world size) after validating every setting; the training loop, the stage chain, the Ray
worker, evaluation and the checkpoint tools take the plan and never validate again. The plan carries:

* the resolved config (read-only) and the overrides it was composed from;
* the device, the layer backend and the layout (TP / PP / VPP / CP / DP / SP and the sequence multiple);
* the batch arithmetic (micro-batches per step);
* megatron-core's configs as checked keyword arguments (``TransformerConfig``,
  ``DistributedDataParallelConfig``, ``OptimizerConfig``, the LR scheduler), precision applied to all
  of them in one place (:mod:`megaglm.training.megatron_fields`);
* for a staged context extension, one plan per stage of the chain.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Mapping, Optional

from omegaconf import DictConfig, OmegaConf

from megaglm.parallel.layout import Layout

__all__ = ["BatchPlan", "MegatronFields", "StagePlan", "RunPlan", "freeze_config"]


def freeze_config(cfg: DictConfig) -> DictConfig:
    """A resolved, read-only copy of ``cfg`` (interpolations such as ``${run.output_dir}`` filled in)."""
    out = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    OmegaConf.set_readonly(out, True)
    OmegaConf.set_struct(out, True)
    return out


@dataclass(frozen=True)
class BatchPlan:
    """The batch arithmetic of a step.

    Attributes:
        micro_batch_size: ``b``, sequences per micro-batch per data-parallel rank.
        global_batch_size: ``G``, sequences per optimizer step over all data-parallel ranks.
        num_microbatches: ``G / (b x DP)``, micro-batches each rank runs per step.
        seq_length: tokens per sequence (``train.seq_length``).
    """

    micro_batch_size: int
    global_batch_size: int
    num_microbatches: int
    seq_length: int

    @property
    def tokens_per_step(self) -> int:
        """``G x seq_length``."""
        return self.global_batch_size * self.seq_length


@dataclass(frozen=True)
class MegatronFields:
    """megatron-core's configs as keyword arguments, checked at pre-flight (read-only mappings).

    Attributes:
        transformer: ``TransformerConfig(**transformer)``.
        ddp: ``DistributedDataParallelConfig(**ddp)``.
        optimizer: ``OptimizerConfig(**optimizer)``.
        scheduler: ``OptimizerParamScheduler(optimizer, **scheduler)``.
    """

    transformer: Mapping[str, Any]
    ddp: Mapping[str, Any]
    optimizer: Mapping[str, Any]
    scheduler: Mapping[str, Any]

    @classmethod
    def of(cls, transformer: dict, ddp: dict, optimizer: dict, scheduler: dict) -> "MegatronFields":
        return cls(*(MappingProxyType(dict(d)) for d in (transformer, ddp, optimizer, scheduler)))


@dataclass(frozen=True)
class StagePlan:
    """One stage of a staged context extension: its name, the overrides composing it, and its plan."""

    name: str
    overrides: tuple[str, ...]
    plan: "RunPlan"


@dataclass(frozen=True)
class RunPlan:
    """A validated, resolved run (see the module docstring). Build it with
    :func:`megaglm.app.preflight.preflight`; change it only through :meth:`with_settings`.

    Attributes:
        config: the resolved run config, read-only (``config.train.lr`` ...).
        overrides: the Hydra overrides it was composed from.
        device_type: ``"cpu"`` or ``"cuda"``.
        backend: the layer backend, ``"te"`` (Transformer Engine) or ``"local"``.
        layout: the validated :class:`megaglm.parallel.layout.Layout`.
        batch: :class:`BatchPlan`.
        megatron: :class:`MegatronFields`.
        data_format: ``"pretrain"`` or ``"chat"``.
        stages: the stage chain (empty outside a staged run); each stage has its own plan.
        resume_notes: what the resume policy decided about settings that differ from the checkpoint the
            run resumes from (:mod:`megaglm.app.resume`), printed when it loads.
    """

    config: DictConfig
    overrides: tuple[str, ...]
    device_type: str
    backend: str
    layout: Layout
    batch: BatchPlan
    megatron: MegatronFields
    data_format: str
    stages: tuple[StagePlan, ...] = field(default=())
    resume_notes: tuple[str, ...] = field(default=())

    @property
    def cfg(self) -> DictConfig:
        """Alias of :attr:`config`."""
        return self.config

    @property
    def stop_iteration(self) -> int:
        """The iteration this run stops at: ``train.exit_after_iters`` when set, else ``train_iters``."""
        t = self.config.train
        return min(int(t.exit_after_iters or t.train_iters), int(t.train_iters))

    def with_settings(self, settings: Mapping[str, Any], overrides: Optional[tuple[str, ...]] = None) -> "RunPlan":
        """A copy whose config has the dotted ``settings`` (e.g. ``{"checkpoint.load_dir": ...}``) set.

        Only settings that no other part of the plan derives from may change this way: ``checkpoint.*``,
        ``stage.parent_checkpoint`` and ``run.output_dir``-derived paths (the stage chain and the Ray
        launcher decide where a run resumes from at run time).

        Raises:
            ValueError: a key outside those sections.
        """
        allowed = ("checkpoint.", "stage.parent_checkpoint", "logging.")
        for key in settings:
            if not key.startswith(allowed):
                raise ValueError(f"{key}: a run plan's {key.split('.')[0]} settings are fixed at pre-flight")
        data = OmegaConf.to_container(self.config, resolve=True)
        cfg = OmegaConf.create(data)
        for key, value in settings.items():
            OmegaConf.update(cfg, key, value, merge=False)
        OmegaConf.set_readonly(cfg, True)
        OmegaConf.set_struct(cfg, True)
        return replace(self, config=cfg, overrides=self.overrides if overrides is None else overrides)
