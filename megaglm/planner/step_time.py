"""Step-time model: compute at an assumed MFU, plus tensor-, context-, data- and pipeline-parallel
communication and the pipeline bubble.

* **compute**: the model FLOPs of :mod:`megaglm.training.flops` (Narayanan et al. 2021 counting, causal
  attention halved), plus what recomputation adds (full: one more forward of every layer; selective: one
  more forward of the core attention), run at ``mfu`` x the GPU's dense peak. The assumed MFU is the
  fraction of peak the GEMMs reach in a well-tuned layout (an input, default 0.4); everything below is
  added to it. Each pipeline stage runs its ``L/p`` layers, the first stage also the embedding (no FLOPs)
  and the last the output layer (``2 h V`` per token forward), so the slowest stage sets the pace.
* **pipeline bubble** (Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on GPU
  Clusters Using Megatron-LM", section 2.2): 1F1B over ``m`` micro-batches on ``p`` stages takes
  ``(m + p - 1)`` micro-batch times, a bubble fraction ``(p - 1)/m``; the interleaved schedule with ``v``
  chunks per stage takes ``(m + (p - 1)/v)``, a fraction ``(p - 1)/(v m)``.
* **tensor parallelism** (Megatron-LM, Shoeybi et al. 2019 / Korthikanti et al. 2022 section 4.2.2): per
  layer and micro-batch two all-reduces forward and two backward of the ``[s/CP, b, h]`` activations (with
  sequence parallelism the same bytes as all-gather + reduce-scatter), two more when full recompute
  re-runs the forward; with TP above the KV groups megatron-core also all-gathers the QKV output. A ring
  all-reduce of ``B`` bytes over ``t`` ranks moves ``2 (t - 1)/t B`` per rank. Not overlapped.
* **context parallelism** (Transformer Engine's ring attention, ``cp_comm_type=p2p``): per layer each rank
  passes its K/V chunk ``CP - 1`` times forward and K/V plus their gradients backward; this overlaps with
  the attention computation, and only the excess counts.
* **data parallelism**: once per step the fp32 gradients are all-reduced over the DP x CP group (``2 (n -
  1)/n`` of the bytes), or with the distributed optimizer reduce-scattered and the updated weights
  all-gathered (``(n - 1)/n`` each; Rajbhandari et al. 2020). Not overlapped (megaglm's default
  ``parallel.overlap_grad_reduce=false``; turning it on hides most of it).
* **pipeline point-to-point**: each micro-batch's activations forward and gradients backward between
  stages, ``[s/CP/t_sp, b, h]``.

Bandwidth: megatron-core orders ranks tensor, context, data, pipeline (``tp-cp-ep-dp-pp``), so a TP group
spans ``t`` consecutive GPUs, a CP group ``t x CP``, the DP x CP group ``t x CP x DP``; a group within a
node uses the NVLink figure of :mod:`megaglm.planner.hardware`, one that crosses nodes the inter-node one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megaglm.planner.parameters import GRAD_BYTES
from megaglm.training.flops import glm_flops_per_token

__all__ = ["Network", "StepTime", "step_time", "bubble_fraction"]


@dataclass(frozen=True)
class Network:
    """Bandwidths in bytes/second per GPU per direction (achieved, i.e. after the link efficiency), and
    GPUs per node."""

    intra_node: float
    inter_node: float
    gpus_per_node: int

    def bandwidth(self, span: int) -> float:
        """Bandwidth of a group spanning ``span`` consecutive ranks (bytes/s)."""
        return self.intra_node if span <= self.gpus_per_node else self.inter_node


@dataclass(frozen=True)
class StepTime:
    """Seconds per optimizer step, and what makes them up.

    Attributes:
        compute: the micro-batches' compute on the slowest stage (no bubble).
        bubble: pipeline fill and drain (micro-batch time x ``(p - 1)/v``).
        tp_comm / cp_comm / pp_comm: exposed communication of all micro-batches (bubble excluded).
        dp_comm: the gradient reduction (and parameter all-gather) once per step.
        total: the step.
    """

    compute: float
    bubble: float
    tp_comm: float
    cp_comm: float
    pp_comm: float
    dp_comm: float
    total: float


def bubble_fraction(pp: int, num_microbatches: int, vpp: Optional[int] = None) -> float:
    """Pipeline bubble over ideal time: ``(p - 1)/m``, interleaved ``(p - 1)/(v m)`` (Narayanan et al. 2021)."""
    v = 1 if vpp is None else int(vpp)
    return (int(pp) - 1) / (v * int(num_microbatches))


def step_time(model_cfg, vocab: int, seq_length: int, micro_batch: int, num_microbatches: int, tp: int,
              pp: int, cp: int, dp: int, vpp: Optional[int], sp: bool, recompute: str,
              distributed_optimizer: bool, params_per_rank: int, peak_flops: float, mfu: float,
              network: Network, act_bytes: int = 2, param_bytes: int = 2) -> StepTime:
    """Estimated seconds per step of one layout (module docstring).

    Args:
        vocab: padded vocabulary. micro_batch: sequences per micro-batch; num_microbatches: per DP rank
            per step. params_per_rank: parameter elements of the largest stage (for the DP reduction).
        peak_flops: the GPU's dense peak, FLOP/s (not TFLOP/s). mfu: assumed fraction of it (0..1].
        act_bytes / param_bytes: bytes per activation / parameter element.
    """
    if not 0 < mfu <= 1:
        raise ValueError(f"mfu={mfu} must be in (0, 1]")
    h, g = int(model_cfg.hidden_size), int(model_cfg.num_query_groups)
    a, d = int(model_cfg.num_attention_heads), int(model_cfg.kv_channels)
    n_layers = int(model_cfg.num_layers)
    v = 1 if vpp is None else int(vpp)
    fl = glm_flops_per_token(n_layers, h, model_cfg.ffn_hidden_size, a, g, d, vocab, seq_length)
    per_layer_train = 3 * fl.per_layer
    if recompute == "full":
        per_layer_train += fl.per_layer
    elif recompute == "selective":
        per_layer_train += fl.attention
    rate = peak_flops * mfu
    tokens = micro_batch * seq_length  # per micro-batch and DP rank
    layers_per_stage = n_layers // pp
    stage_flops = tokens * layers_per_stage * per_layer_train
    last_stage_flops = stage_flops + tokens * 3 * fl.output
    t_compute = max(stage_flops, last_stage_flops) / (tp * cp) / rate

    # tensor parallelism
    t_tp = 0.0
    if tp > 1:
        bw = network.bandwidth(tp)
        vol = tokens / cp * h * act_bytes
        n_coll = 4 + (2 if recompute == "full" else 0)
        t_tp = layers_per_stage * n_coll * 2 * (tp - 1) / tp * vol / bw
        if tp > g:  # QKV output all-gather forward, reduce-scatter backward (and again when recomputed)
            qkv = tokens / cp * (a + 2 * g) * d * act_bytes
            t_tp += layers_per_stage * (2 + (1 if recompute == "full" else 0)) * (tp - 1) / tp * qkv / bw
    # context parallelism: K/V ring, overlapped with the attention
    t_cp = 0.0
    if cp > 1:
        bw = network.bandwidth(tp * cp)
        kv_heads = g / tp if tp <= g else 1
        kv = tokens / cp * 2 * kv_heads * d * act_bytes
        passes = 1 + 2 + (1 if recompute == "full" else 0)  # forward, backward (K/V + dK/dV), re-forward
        transfer = (cp - 1) * kv * passes / bw
        attention = tokens / cp * fl.attention * (3 + (1 if recompute in ("full", "selective") else 0)) / tp / rate
        t_cp = layers_per_stage * max(0.0, transfer - attention)
    # pipeline point-to-point
    t_pp = 0.0
    if pp > 1:
        bw = network.bandwidth(tp * cp * dp * pp)
        sp_split = tp if (sp and tp > 1) else 1
        t_pp = 2 * tokens / cp / sp_split * h * act_bytes / bw * v  # per micro-batch, per chunk boundary
    t_mb = t_compute + t_tp + t_cp + t_pp
    compute = num_microbatches * t_compute
    bubble = (pp - 1) / v * t_mb if pp > 1 else 0.0
    # data parallelism over DP x CP
    n = dp * cp
    t_dp = 0.0
    if n > 1:
        bw = network.bandwidth(tp * cp * dp)
        grads = params_per_rank * GRAD_BYTES
        if distributed_optimizer:
            t_dp = (n - 1) / n * (grads + params_per_rank * param_bytes) / bw
        else:
            t_dp = 2 * (n - 1) / n * grads / bw
    m = num_microbatches
    total = m * t_mb + bubble + t_dp
    return StepTime(compute, bubble, m * t_tp, m * t_cp, m * t_pp, t_dp, total)
