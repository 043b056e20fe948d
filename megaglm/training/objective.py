"""Pre-flight checks of the pretraining objective (``data.objective``) against the model and the layout.

Called once by :func:`megaglm.app.preflight.preflight`; each failure is one ``ValueError`` naming the key
and what to change.
"""

from __future__ import annotations

from typing import Any, Mapping

__all__ = ["check_objective"]


def check_objective(cfg: Any, transformer_fields: Mapping[str, Any], backend: str) -> None:
    """Check ``data.objective`` / ``data.glm`` and the model's position embedding against the run.

    * ``data.objective`` is ``causal`` or ``glm``;
    * ``glm``: pretraining data only (``data.format=pretrain``), valid ``data.glm`` settings
      (:class:`megaglm.data.glm_objective.GLMSettings`), ``train.seq_length >= 8``, megaglm's SDPA core
      attention (the only one that takes GLM's prefix mask; context parallelism included), no fused RoPE
      kernel (per-token position tables);
    * ``model.position_embedding_type=rope_2d``: not with packed chat data (``data.format=chat``).

    Args:
        cfg: the composed run config.
        transformer_fields: the checked ``TransformerConfig`` fields (reads ``apply_rope_fusion``).
        backend: the layer backend (``te`` | ``local``).

    Raises:
        ValueError: as listed above.
    """
    from megaglm.data.glm_objective import OBJECTIVES, GLMSettings
    from megaglm.models.glm.spec import check_attention_backend

    data, model = cfg.data, cfg.model
    objective = str(data.get("objective", "causal"))
    if objective not in OBJECTIVES:
        raise ValueError(f"data.objective={objective!r}: expected one of {', '.join(OBJECTIVES)}")
    if str(model.get("position_embedding_type", "rope")) == "rope_2d" and str(data.format) == "chat":
        raise ValueError("model.position_embedding_type=rope_2d with data.format=chat: 2D positions are not "
                         "defined for packed conversations; use position_embedding_type=rope for chat SFT")
    if objective != "glm":
        return
    if str(data.format) != "pretrain":
        raise ValueError(f"data.objective=glm works on pretraining windows; data.format={data.format} is not "
                         "supported (use data.format=pretrain or data.objective=causal)")
    GLMSettings.from_config(data.glm)
    if int(cfg.train.seq_length) < 8:
        raise ValueError(f"data.objective=glm needs train.seq_length >= 8 (got {cfg.train.seq_length})")
    attention = check_attention_backend(model.get("attention_backend", "auto"), backend == "te")
    if attention != "sdpa":
        raise ValueError(
            f"data.objective=glm needs megaglm's SDPA core attention (the one that takes GLM's bidirectional "
            f"prefix mask); model.attention_backend={model.get('attention_backend', 'auto')} resolves to "
            f"{attention}: set model.attention_backend=sdpa")
    if transformer_fields.get("apply_rope_fusion"):
        raise ValueError("data.objective=glm uses per-token RoPE tables, which the fused RoPE kernel does not "
                         "take: set train.apply_rope_fusion=false")
