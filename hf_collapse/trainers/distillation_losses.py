"""Distillation losses of Dual-Head KD, as the official code (github.com/penghui-yang/DHKD) implements them.

All take student logits `z_s` and teacher logits `z_t` of shape `(N, C)` and return a scalar batch mean.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["hinton_kd_loss", "binary_kl_norm_loss", "binary_kl_loss", "LOGIT_LOSSES"]

_EPS = 1e-8


def hinton_kd_loss(z_s: torch.Tensor, z_t: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · KL(softmax(z_t/T) ‖ softmax(z_s/T)), averaged over the batch (Hinton et al. 2015)."""
    T = temperature
    log_p_s = F.log_softmax(z_s.float() / T, dim=-1)
    log_p_t = F.log_softmax(z_t.float() / T, dim=-1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * T * T


def binary_kl_norm_loss(z_s: torch.Tensor, z_t: torch.Tensor, temperature: float) -> torch.Tensor:
    """The paper's logit-level loss: the Bernoulli KL of d = σ((z_s − z_t)/T) against ½.

    T² · Σ_{i,c} [−log 2 − ½·log d − ½·log(1−d)] / N. It is zero iff z_s = z_t, and its gradient
    (T/N)·(σ(Δ/T) − ½) is bounded, unlike an L2 on raw logits.
    """
    T = temperature
    delta = (z_s.float() - z_t.float()) / T
    # log σ(Δ) and log(1−σ(Δ)) = log σ(−Δ) via logsigmoid are stable; clamping matches the official clamp of d.
    log_d = F.logsigmoid(delta).clamp(math.log(_EPS), math.log1p(-_EPS))
    log_1md = F.logsigmoid(-delta).clamp(math.log(_EPS), math.log1p(-_EPS))
    per_elem = -math.log(2.0) - 0.5 * log_d - 0.5 * log_1md
    return per_elem.sum() / z_s.shape[0] * T * T


def binary_kl_loss(z_s: torch.Tensor, z_t: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · Σ_{i,c} KL(Bern(σ(z_t/T)) ‖ Bern(σ(z_s/T))) / N (in the official code, unused in the paper)."""
    T = temperature
    s, t = z_s.float() / T, z_t.float() / T
    p_t = torch.sigmoid(t)
    kl = p_t * (F.logsigmoid(t) - F.logsigmoid(s)) + (1 - p_t) * (F.logsigmoid(-t) - F.logsigmoid(-s))
    return kl.sum() / z_s.shape[0] * T * T


LOGIT_LOSSES = {"binary_kl_norm": binary_kl_norm_loss, "binary_kl": binary_kl_loss}
