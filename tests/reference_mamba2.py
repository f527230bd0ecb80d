"""Slow float64 token-by-token reference for RobustMamba2, written from the equations in issue 3.

Per layer and head (1-indexed positions t):
    Δ_t = clamp(softplus(dt_t + dt_bias)),  A = −exp(A_log)·decay_scale,  B_t ← insertion_scale·B_t
    (decay_scale: one number, or a (layers, heads) table whose row for this layer scales each head's A)
    h_t = exp(Δ_t·A)·h_{t−1} + Δ_t·x_t B_tᵀ                          (x_t: head_dim, B_t: state)
    sliding_window r: y_t = C_t·(h_t − exp(A·Σ_{j=b+1..t} Δ_j)·h_b),  b = r·max(0, ⌈t/r⌉ − 2)   else y_t = C_t·h_t
    y_t += D·x_t
    state_norm_max τ, state_norm_every S: if t % S == 0: h_t ← h_t·min(1, τ/‖h_t‖_F)   (after y_t is read)
No chunking, no segments, no cache: every state h_t is kept and the equations are applied literally.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# the tiny robust Mamba-2 shape of the tests: n_groups > 1 and chunks short enough to have several in a sequence
TINY = dict(
    num_heads=4,
    head_dim=8,
    hidden_size=16,
    state_size=8,
    n_groups=2,
    num_hidden_layers=2,
    vocab_size=50,
    chunk_size=8,
    pad_token_id=0,
    eos_token_id=1,
    bos_token_id=2,
)

def _mixer(mixer, config, hidden, layer_idx):
    """hidden (b, T, d) float64 -> mixer output (b, T, d) float64."""
    b, T, _ = hidden.shape
    H, P, N, G = mixer.num_heads, mixer.head_dim, mixer.ssm_state_size, mixer.n_groups
    I = mixer.intermediate_size
    proj = F.linear(
        hidden, mixer.in_proj.weight.double(), None if mixer.in_proj.bias is None else mixer.in_proj.bias.double()
    )
    gate, xBC, dt = proj.split([I, mixer.conv_dim, H], dim=-1)
    K = mixer.conv_kernel_size
    w = mixer.conv1d.weight.double()[:, 0]  # (channels, K)
    padded = F.pad(xBC, (0, 0, K - 1, 0))  # (b, T+K-1, channels)
    conv = sum(padded[:, k : k + T] * w[:, k] for k in range(K))
    if mixer.conv1d.bias is not None:
        conv = conv + mixer.conv1d.bias.double()
    xBC = F.silu(conv)
    x, Bm, Cm = xBC.split([I, G * N, G * N], dim=-1)
    x = x.view(b, T, H, P)
    Bm = Bm.view(b, T, G, N).repeat_interleave(H // G, dim=2) * config.insertion_scale  # (b, T, H, N)
    Cm = Cm.view(b, T, G, N).repeat_interleave(H // G, dim=2)
    delta = F.softplus(dt + mixer.dt_bias.double()).clamp(*config.time_step_limit)  # (b, T, H)
    A = -torch.exp(mixer.A_log.double()) * _decay_scales(config.decay_scale, layer_idx, H)  # (H,)
    D = mixer.D.double()
    caps = config.state_norm_caps(layer_idx)
    r, S = config.sliding_window, config.state_norm_every

    h = torch.zeros(b, H, P, N, dtype=torch.float64)
    states = [h]  # states[t] = h_t (after any cap), h_0 = 0
    ys = []
    for t in range(1, T + 1):
        d = delta[:, t - 1]  # (b, H)
        h = torch.exp(d * A)[..., None, None] * h + (d[..., None] * x[:, t - 1])[..., None] * Bm[:, t - 1, :, None, :]
        read = h
        if r is not None:
            bnd = r * max(0, math.ceil(t / r) - 2)
            dsum = delta[:, bnd:t].sum(dim=1)  # Σ_{j=b+1..t} Δ_j, (b, H)
            read = h - torch.exp(A * dsum)[..., None, None] * states[bnd]
        y = torch.einsum("bhpn,bhn->bhp", read, Cm[:, t - 1]) + D[:, None] * x[:, t - 1]
        ys.append(y)
        if caps is not None and t % S == 0:
            norm = h.flatten(2).norm(dim=-1)
            h = h * torch.clamp(torch.tensor(caps, dtype=torch.float64) / norm, max=1.0)[..., None, None]
        states.append(h)
    y = torch.stack(ys, dim=1).reshape(b, T, H * P)
    # gated RMSNorm (per group) and output projection
    y = y * F.silu(gate)
    yg = y.view(b, T, G, I // G)
    yg = yg * torch.rsqrt(yg.pow(2).mean(-1, keepdim=True) + mixer.norm.variance_epsilon)
    y = mixer.norm.weight.double() * yg.view(b, T, I)
    return F.linear(
        y, mixer.out_proj.weight.double(), None if mixer.out_proj.bias is None else mixer.out_proj.bias.double()
    )


def _decay_scales(decay_scale, layer_idx, heads):
    """(H,) float64 decay scales of one layer, from one number or a (layers, heads) table (read here, not via the
    config's helpers, so the reference shares no code with the model)."""
    if isinstance(decay_scale, (list, tuple)):
        row = decay_scale[layer_idx]
        assert len(row) == heads
        return torch.tensor([float(v) for v in row], dtype=torch.float64)
    return torch.full((heads,), float(decay_scale), dtype=torch.float64)


def _rms(x, norm):
    return norm.weight.double() * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon))


@torch.no_grad()
def reference_logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    """float64 logits (b, T, vocab) of a RobustMamba2ForCausalLM (its config decides the mitigations)."""
    config = model.config
    h = model.backbone.embeddings.weight.double()[input_ids]
    for i, block in enumerate(model.backbone.layers):
        h = h + _mixer(block.mixer, config, _rms(h, block.norm), i)
    h = _rms(h, model.backbone.norm_f)
    return h @ model.lm_head.weight.double().T
