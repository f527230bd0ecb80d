"""Slow, plain reference implementations of the DHKD losses, written from the design doc's formulas.

Loops over samples and classes in float64 on purpose: nothing here shares code with the fast implementation.
"""

from __future__ import annotations

import math

import torch


def _softmax(row: list[float]) -> list[float]:
    m = max(row)
    e = [math.exp(v - m) for v in row]
    s = sum(e)
    return [v / s for v in e]


def _sigmoid(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


def ce(z: torch.Tensor, y: torch.Tensor) -> float:
    total = 0.0
    for row, label in zip(z.double().tolist(), y.tolist()):
        total += -math.log(_softmax(row)[label])
    return total / len(y)


def hinton_kd(z_s: torch.Tensor, z_t: torch.Tensor, T: float) -> float:
    """T² · KL(softmax(z_t/T) ‖ softmax(z_s/T)), batch mean."""
    total = 0.0
    for s, t in zip(z_s.double().tolist(), z_t.double().tolist()):
        p_s = _softmax([v / T for v in s])
        p_t = _softmax([v / T for v in t])
        total += sum(pt * (math.log(pt) - math.log(ps)) for pt, ps in zip(p_t, p_s))
    return T * T * total / len(z_s)


def binary_kl_norm(z_s: torch.Tensor, z_t: torch.Tensor, T: float) -> float:
    """d = clamp(σ((z_s − z_t)/T), 1e-8, 1 − 1e-8); T² · Σ_{i,c} [−log 2 − ½ log d − ½ log(1−d)] / N."""
    total = 0.0
    for s, t in zip(z_s.double().tolist(), z_t.double().tolist()):
        for a, b in zip(s, t):
            d = min(max(_sigmoid((a - b) / T), 1e-8), 1 - 1e-8)
            total += -math.log(2) - 0.5 * math.log(d) - 0.5 * math.log(1 - d)
    return T * T * total / len(z_s)


def binary_kl(z_s: torch.Tensor, z_t: torch.Tensor, T: float) -> float:
    """T² · Σ_{i,c} KL(Bern(σ(z_t/T)) ‖ Bern(σ(z_s/T))) / N."""
    total = 0.0
    for s, t in zip(z_s.double().tolist(), z_t.double().tolist()):
        for a, b in zip(s, t):
            ps, pt = _sigmoid(a / T), _sigmoid(b / T)
            total += pt * math.log(pt / ps) + (1 - pt) * math.log((1 - pt) / (1 - ps))
    return T * T * total / len(z_s)


def pcgrad_one_sided(g_ce: torch.Tensor, g_kd: torch.Tensor) -> torch.Tensor:
    """Combined flat gradient: g_kd projected off g_ce when they conflict, plus g_ce."""
    g_ce, g_kd = g_ce.double(), g_kd.double()
    dot = float(g_kd @ g_ce)
    if dot < 0:
        g_kd = g_kd - dot / float(g_ce @ g_ce) * g_ce
    return g_ce + g_kd
