"""Pairwise preference losses on sequence log-probabilities / rewards (pure functions, any device).

Notation, per pair ``k``: ``pi_c``, ``pi_r`` = summed log-probability (nats) of the chosen / rejected
response tokens under the policy; ``ref_c``, ``ref_r`` the same under the frozen reference; ``n_c``,
``n_r`` the number of response tokens; ``beta > 0``. Log-ratios ``lr_c = pi_c - ref_c``,
``lr_r = pi_r - ref_r``; implicit rewards ``beta * lr_c`` / ``beta * lr_r`` (Rafailov et al. 2023, sec. 5).

* ``sigmoid`` -- DPO, Rafailov et al. 2023, eq. 7: ``-log sigmoid(beta (lr_c - lr_r))``; with label
  smoothing ``eps`` (conservative DPO, Mitchell 2023: the label is flipped with probability ``eps``):
  ``-(1 - eps) log sigmoid(beta d) - eps log sigmoid(-beta d)``.
* ``ipo`` -- IPO, Azar et al. 2023, eq. 17: ``(d - 1 / (2 beta))^2`` with the log-ratios averaged per
  response token, ``d = lr_c / n_c - lr_r / n_r`` (the normalisation TRL's ``DPOTrainer`` uses for
  ``loss_type="ipo"``, which the IPO authors confirmed matches their experiments).
* ``sigmoid_norm`` -- length-normalised DPO: the sigmoid loss (with ``eps``) on
  ``d = lr_c / n_c - lr_r / n_r`` (TRL's ``loss_type="sigmoid_norm"``).

Reward models: ``bradley_terry_loss`` = ``-log sigmoid(r_c - r_r)`` (Bradley & Terry 1952; the reward
model loss of Ouyang et al. 2022, eq. 1, and of ChatGLM-RLHF, Hou et al. 2024).

Every function returns per-pair values (float tensors ``[P]``), so callers sum over pairs and divide by
the global pair count once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["DPO_LOSSES", "dpo_losses", "bradley_terry_loss", "check_dpo_settings"]

DPO_LOSSES = ("sigmoid", "ipo", "sigmoid_norm")


def check_dpo_settings(loss: str, beta: float, label_smoothing: float) -> None:
    """Raises ValueError naming ``train.dpo.*`` for an unknown loss, ``beta <= 0`` or ``eps`` outside
    ``[0, 0.5)`` (or ``eps > 0`` with ``ipo``)."""
    if loss not in DPO_LOSSES:
        raise ValueError(f"train.dpo.loss={loss!r}: expected one of {', '.join(DPO_LOSSES)}")
    if not float(beta) > 0:
        raise ValueError(f"train.dpo.beta={beta} must be > 0")
    if not 0 <= float(label_smoothing) < 0.5:
        raise ValueError(f"train.dpo.label_smoothing={label_smoothing} must be in [0, 0.5)")
    if loss == "ipo" and float(label_smoothing) > 0:
        raise ValueError("train.dpo.label_smoothing applies to the sigmoid losses; set it to 0 with train.dpo.loss=ipo")


def dpo_losses(pi_c: torch.Tensor, pi_r: torch.Tensor, ref_c: torch.Tensor, ref_r: torch.Tensor,
               beta: float, loss: str = "sigmoid", label_smoothing: float = 0.0,
               n_c: torch.Tensor | None = None, n_r: torch.Tensor | None = None):
    """Per-pair DPO-family losses and implicit rewards.

    Args:
        pi_c, pi_r, ref_c, ref_r: float ``[P]`` summed response log-probs (nats); gradients flow through
            ``pi_*`` only when the reference values are detached (they are constants of the loss).
        beta: the KL-penalty strength (``tau`` in IPO).
        loss: ``sigmoid`` | ``ipo`` | ``sigmoid_norm``.
        label_smoothing: ``eps`` of conservative DPO (sigmoid losses).
        n_c, n_r: response tokens per sequence (``ipo`` / ``sigmoid_norm``; clamped to >= 1).

    Returns:
        ``(losses [P], chosen_rewards [P], rejected_rewards [P])``, rewards = ``beta * log-ratio``
        detached (the metrics TRL reports as ``rewards/chosen`` / ``rewards/rejected``).

    Raises:
        ValueError: see :func:`check_dpo_settings`; token counts missing for a normalised loss.
    """
    check_dpo_settings(loss, beta, label_smoothing)
    lr_c = pi_c - ref_c
    lr_r = pi_r - ref_r
    if loss in ("ipo", "sigmoid_norm"):
        if n_c is None or n_r is None:
            raise ValueError(f"train.dpo.loss={loss} needs the response token counts")
        d = lr_c / n_c.to(lr_c.dtype).clamp(min=1) - lr_r / n_r.to(lr_r.dtype).clamp(min=1)
    else:
        d = lr_c - lr_r
    if loss == "ipo":
        out = (d - 1.0 / (2.0 * float(beta))) ** 2
    else:
        eps = float(label_smoothing)
        out = -(1.0 - eps) * F.logsigmoid(float(beta) * d)
        if eps:
            out = out - eps * F.logsigmoid(-float(beta) * d)
    return out, float(beta) * lr_c.detach(), float(beta) * lr_r.detach()


def bradley_terry_loss(r_c: torch.Tensor, r_r: torch.Tensor) -> torch.Tensor:
    """``-log sigmoid(r_c - r_r)`` per pair (float ``[P]``), for scalar rewards ``r_c`` / ``r_r`` ``[P]``."""
    return -F.logsigmoid(r_c - r_r)
