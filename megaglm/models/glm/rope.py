"""RoPE frequency tables for GLM context extension: base change, linear interpolation, NTK-aware, YaRN.

GLM applies rotary position embedding to the first ``d = kv_channels x rotary_percent`` dims of every
head (64 of 128 for GLM-4), pairing adjacent dims (``rotary_interleaved``). Pair ``i`` (``0 <= i < d/2``)
of a token at position ``m`` is rotated by the angle ``m x theta_i`` with the *inverse-frequency table*

    theta_i = base^(-2i / d)                                                     (Su et al. 2021)

The options of ``model.rope_scaling`` change that table (``s = model.rope_scaling_factor``):

``none``
    the table above. GLM's own recipe extends context by raising ``model.rotary_base`` alone
    (``rope_ratio``: 1e4 at 8K, 5e6 for GLM-4-9B-Chat 128K, 1e8 for the 1M model).
``linear`` -- position interpolation (Chen et al. 2023, "Extending Context Window of Large Language
    Models via Positional Interpolation", arXiv 2306.15595): positions are divided by ``s``, i.e.
    ``theta'_i = theta_i / s``. Implemented with megatron-core's ``seq_len_interpolation_factor``.
``ntk`` -- NTK-aware scaling (bloc97 2023, "NTK-Aware Scaled RoPE allows LLaMA models to have extended
    (8k+) context size without any fine-tuning", r/LocalLLaMA): the base is raised to
    ``base' = base x s^(d / (d - 2))`` so that the lowest frequency is interpolated by ``s`` while the
    highest is kept. Implemented by passing ``base'`` to megatron-core's ``RotaryEmbedding``.
``yarn`` -- YaRN (Peng et al. 2023, "YaRN: Efficient Context Window Extension of Large Language Models",
    arXiv 2309.00071), "NTK-by-parts" + attention temperature. With ``L = model.rope_original_seq_length``
    (the pre-extension context) and the reference code's correction range
    ``dim(r) = d x ln(L / (2 pi r)) / (2 ln base)``, ``low = floor(dim(beta_fast))``,
    ``high = ceil(dim(beta_slow))`` (clamped to ``[0, d - 1]``), the ramp
    ``gamma_i = clamp((i - low) / (high - low), 0, 1)`` blends
    ``theta'_i = theta_i x (1 - gamma_i) + (theta_i / s) x gamma_i`` -- pairs rotating many times over
    ``L`` keep their frequency, slow ones are interpolated. Both q and k are multiplied by
    ``mscale = 0.1 ln(s) + 1`` (the paper's ``sqrt(1/t)``), i.e. attention logits by ``mscale^2``.
    megatron-core's ``YarnRotaryEmbedding`` refuses interleaved RoPE and sizes its table by the whole
    head dim, so for GLM the YaRN table is computed here (same formulas as megatron-core's
    ``_yarn_find_correction_range`` / ``_yarn_linear_ramp_mask``, over the rotary dims) and installed in
    the standard ``RotaryEmbedding``; the temperature reaches megatron-core's ``apply_rotary_pos_emb``
    through the ``TransformerConfig`` attributes ``yarn_rotary_scaling_factor`` / ``yarn_mscale`` /
    ``yarn_mscale_all_dim`` (read by ``_yarn_get_concentration_factor_from_config``).

The inverse-frequency table is not stored in checkpoints (megatron-core drops ``inv_freq`` on load): it is
recomputed from the model config whenever a model is built, so a stage that changes the base or the
scaling gets its own table even when it starts from the previous stage's weights.
:func:`effective_inv_freq` reads the table a built model really uses, :func:`expected_inv_freq` computes
it from the config (in float64, independently of megatron-core), and the tests compare the two.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch

__all__ = [
    "ROPE_SCALINGS",
    "rotary_dim",
    "rope_settings",
    "expected_inv_freq",
    "yarn_mscale",
    "gptmodel_rope_kwargs",
    "config_rope_attributes",
    "install_rope",
    "effective_inv_freq",
]

ROPE_SCALINGS = ("none", "linear", "ntk", "yarn")


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    if isinstance(cfg, dict):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def rotary_dim(model_cfg: Any) -> int:
    """Number of rotated dims per head, ``int(kv_channels x rotary_percent)`` (megatron-core's rule).

    Raises:
        ValueError: the result is not a positive even number.
    """
    d = int(int(_get(model_cfg, "kv_channels")) * float(_get(model_cfg, "rotary_percent", 1.0)))
    if d <= 0 or d % 2:
        raise ValueError(
            f"model.kv_channels x model.rotary_percent = {d}: the rotary dims must be a positive even number"
        )
    return d


def rope_settings(model_cfg: Any) -> dict:
    """The validated RoPE settings of a model config.

    Returns:
        ``{"scaling", "base", "factor", "dim", "original_seq_length", "beta_fast", "beta_slow"}``.

    Raises:
        ValueError: unknown ``model.rope_scaling``; a non-positive base or factor; ``yarn`` without
            ``model.rope_original_seq_length``; ``beta_fast <= beta_slow``. Messages name the key.
    """
    scaling = str(_get(model_cfg, "rope_scaling", "none") or "none").lower()
    if scaling in ("null", ""):
        scaling = "none"
    if scaling not in ROPE_SCALINGS:
        raise ValueError(f"model.rope_scaling={scaling!r}: expected one of {', '.join(ROPE_SCALINGS)}")
    base = float(_get(model_cfg, "rotary_base", 10000.0))
    if not math.isfinite(base) or base <= 1.0:
        raise ValueError(f"model.rotary_base={base} must be a finite number > 1")
    factor = float(_get(model_cfg, "rope_scaling_factor", 1.0))
    if not math.isfinite(factor) or factor <= 0:
        raise ValueError(f"model.rope_scaling_factor={factor} must be a positive number")
    if scaling in ("ntk", "yarn") and factor < 1.0:
        raise ValueError(f"model.rope_scaling={scaling} needs model.rope_scaling_factor >= 1 (got {factor})")
    orig = _get(model_cfg, "rope_original_seq_length", None)
    beta_fast = float(_get(model_cfg, "yarn_beta_fast", 32.0))
    beta_slow = float(_get(model_cfg, "yarn_beta_slow", 1.0))
    if scaling == "yarn":
        if orig is None or int(orig) <= 0:
            raise ValueError(
                "model.rope_scaling=yarn needs model.rope_original_seq_length (the context the model was "
                "trained at before the extension, e.g. 8192)"
            )
        if not beta_fast > beta_slow > 0:
            raise ValueError(
                f"model.yarn_beta_fast={beta_fast} must be larger than model.yarn_beta_slow={beta_slow} > 0"
            )
    return {
        "scaling": scaling,
        "base": base,
        "factor": factor,
        "dim": rotary_dim(model_cfg),
        "original_seq_length": None if orig is None else int(orig),
        "beta_fast": beta_fast,
        "beta_slow": beta_slow,
    }


def _yarn_ramp(dim: int, base: float, original: int, beta_fast: float, beta_slow: float) -> list[float]:
    """gamma_i of YaRN (1 = keep the original frequency, 0 = interpolate), i < dim/2."""

    def correction_dim(num_rotations: float) -> float:
        return dim * math.log(original / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = [min(max((i - low) / (high - low), 0.0), 1.0) for i in range(dim // 2)]
    return [1.0 - r for r in ramp]


def expected_inv_freq(model_cfg: Any) -> torch.Tensor:
    """The effective inverse-frequency table of a model config, computed in float64 from the formulas
    in the module docstring (no megatron-core code involved).

    Returns:
        float64 ``[d / 2]``: the angle per position of each rotary pair, after scaling (so for ``linear``
        it is the base table divided by the factor).

    Raises:
        ValueError: see :func:`rope_settings`.
    """
    st = rope_settings(model_cfg)
    d, base, s = st["dim"], st["base"], st["factor"]
    if st["scaling"] == "ntk":
        base = base * s ** (d / (d - 2))
    theta = [base ** (-(2 * i) / d) for i in range(d // 2)]
    if st["scaling"] == "linear":
        theta = [t / s for t in theta]
    elif st["scaling"] == "yarn":
        keep = _yarn_ramp(d, base, st["original_seq_length"], st["beta_fast"], st["beta_slow"])
        theta = [t * k + (t / s) * (1.0 - k) for t, k in zip(theta, keep)]
    return torch.tensor(theta, dtype=torch.float64)


def yarn_mscale(model_cfg: Any) -> float:
    """YaRN's q/k scale ``0.1 ln(s) + 1`` (1.0 for the other scalings or ``s <= 1``)."""
    st = rope_settings(model_cfg)
    if st["scaling"] != "yarn" or st["factor"] <= 1.0:
        return 1.0
    return 0.1 * math.log(st["factor"]) + 1.0


def gptmodel_rope_kwargs(model_cfg: Any) -> dict:
    """``GPTModel`` keyword arguments for the config's RoPE: ``rotary_base`` (NTK-raised for ``ntk``)
    and ``seq_len_interpolation_factor`` (``linear`` only)."""
    st = rope_settings(model_cfg)
    base = st["base"]
    if st["scaling"] == "ntk":
        base = base * st["factor"] ** (st["dim"] / (st["dim"] - 2))
    return {
        "rotary_base": base,
        "seq_len_interpolation_factor": st["factor"] if st["scaling"] == "linear" else None,
    }


def config_rope_attributes(model_cfg: Any) -> dict:
    """Attributes to set on the ``TransformerConfig`` so megatron-core's ``apply_rotary_pos_emb`` applies
    YaRN's temperature (empty unless ``yarn``). ``mscale=1, mscale_all_dim=0`` gives megatron-core's
    concentration factor ``0.1 ln(s) + 1``."""
    st = rope_settings(model_cfg)
    if st["scaling"] != "yarn":
        return {}
    return {"yarn_rotary_scaling_factor": st["factor"], "yarn_mscale": 1.0, "yarn_mscale_all_dim": 0.0}


def install_rope(model, model_cfg: Any) -> None:
    """Put the config's table into a built ``GPTModel``'s ``rotary_pos_emb`` where megatron-core's own
    constructor arguments cannot express it (``yarn``); a no-op for the other scalings.

    Raises:
        ValueError: the model has no standard ``RotaryEmbedding``, or its table size differs.
    """
    st = rope_settings(model_cfg)
    if st["scaling"] != "yarn":
        return
    rope = getattr(model, "rotary_pos_emb", None)
    if rope is None or not hasattr(rope, "inv_freq"):
        raise ValueError("model.rope_scaling=yarn: the model has no rotary embedding to scale")
    table = expected_inv_freq(model_cfg).to(dtype=torch.float32, device=rope.inv_freq.device)
    if table.shape != rope.inv_freq.shape:
        raise ValueError(f"YaRN table has {table.numel()} entries, the model's rotary embedding "
                         f"{rope.inv_freq.numel()}")
    rope.inv_freq = table
    if hasattr(rope.forward, "cache_clear"):
        rope.forward.cache_clear()


def effective_inv_freq(model) -> Optional[torch.Tensor]:
    """The table a built ``GPTModel`` (or DDP wrapper) really applies: ``inv_freq`` divided by its
    ``seq_len_interpolation_factor``; float64 ``[d / 2]`` on CPU, or None without RoPE."""
    model = getattr(model, "module", model)
    rope = getattr(model, "rotary_pos_emb", None)
    if rope is None or not hasattr(rope, "inv_freq"):
        return None
    table = rope.inv_freq.detach().double().cpu()
    factor: Optional[float] = getattr(rope, "seq_len_interpolation_factor", None)
    if factor is not None:
        table = table / float(factor)
    return table
