"""State collapse on real text, at small scale, and the three training-free mitigations.

This script uses data OUTSIDE the repository: ``../shared/data/corpus`` (relative to the repository root), i.e. the
NLTK ``state_union`` and ``inaugural`` corpora (plain English speeches). Nothing is downloaded.

Setup (a *controlled model* of a pretrained checkpoint, see docs/robust_mamba2.md):
- a byte-level Mamba-2 (vocab 256) trained from scratch with a short training length T_train;
- some heads are given long memory the way pretrained Mamba-2 checkpoints have it (some heads there keep the first
  token with α > 0.997): their ``A_log`` and ``dt_bias`` are initialised to a half-life of ``--long_half_life``
  tokens and frozen. The rest is trained normally. Without this, a model this small learns half-lives of 8-100
  tokens and its state never fills (the feasibility check in issue 3).

Then, on held-out speeches (never used for training or calibration), per-position loss far beyond T_train and the
state norms, without and with each mitigation, and a passkey grid. ``state_norm_max`` is calibrated on training text
windows of length T_train only.

    python examples/state_collapse/run_experiment.py --minutes 8 --out examples/state_collapse/out
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
import zipfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from hf_collapse import RobustMamba2Config, RobustMamba2ForCausalLM, calibrate_state_norms  # noqa: E402
from hf_collapse.evals.common import ByteTokenizer  # noqa: E402
from hf_collapse.evals.passkey import plot_passkey, run_passkey  # noqa: E402
from hf_collapse.evals.position_loss import plot_position_loss, plot_state_norms, position_loss  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "corpus"  # ../shared/data/corpus: outside the repository


def load_speeches(data_dir: Path) -> tuple[list[bytes], list[bytes]]:
    """(training texts, held-out texts): the 5 most recent State of the Union speeches are held out."""
    train, held = [], []
    for name in ("state_union.zip", "inaugural.zip"):
        with zipfile.ZipFile(data_dir / name) as z:
            files = sorted(n for n in z.namelist() if n.endswith(".txt"))
            texts = [z.read(n) for n in files]
        if name == "state_union.zip":
            train += texts[:-5]
            held += texts[-5:]
        else:
            train += texts
    return train, held


def build_model(args) -> RobustMamba2ForCausalLM:
    config = RobustMamba2Config(
        vocab_size=256,
        hidden_size=args.d_model,
        num_hidden_layers=args.layers,
        expand=2,
        head_dim=args.head_dim,
        num_heads=2 * args.d_model // args.head_dim,
        state_size=args.state_size,
        n_groups=1,
        chunk_size=64,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=None,
        tie_word_embeddings=True,
    )
    torch.manual_seed(args.seed)
    model = RobustMamba2ForCausalLM(config)
    # long-memory heads: Δ ≈ softplus(dt_bias) = dt0 and A = −a with exp(−dt0·a·half_life) = 1/2
    dt0 = 1e-2
    a = math.log(2) / (dt0 * args.long_half_life)
    with torch.no_grad():
        for block in model.backbone.layers:
            mixer = block.mixer
            mixer.A_log[: args.long_heads] = math.log(a)
            mixer.dt_bias[: args.long_heads] = dt0 + math.log(-math.expm1(-dt0))  # softplus⁻¹(dt0)
    return model


def freeze_long_heads(model, n_long: int) -> None:
    """Zero the gradient of the long heads' A_log and dt_bias (the data-dependent dt projection still trains)."""

    def hook(grad):
        grad = grad.clone()
        grad[:n_long] = 0
        return grad

    for block in model.backbone.layers:
        block.mixer.A_log.register_hook(hook)
        block.mixer.dt_bias.register_hook(hook)


def half_lives(model, text: torch.Tensor) -> list[list[float]]:
    """Per (layer, head): tokens for α_{i:t} to reach 1/2, from the mean Δ over ``text`` (1, T)."""
    out = []
    captured = {}

    def grab(i):
        def fn(module, inputs, output):
            captured[i] = output

        return fn

    hooks = [blk.mixer.in_proj.register_forward_hook(grab(i)) for i, blk in enumerate(model.backbone.layers)]
    with torch.no_grad():
        model(text, logits_to_keep=1)
    for h in hooks:
        h.remove()
    for i, blk in enumerate(model.backbone.layers):
        m = blk.mixer
        dt = captured[i][..., -m.num_heads :]
        delta = torch.nn.functional.softplus(dt + m.dt_bias).mean(dim=(0, 1))
        rate = delta * torch.exp(m.A_log)  # −log α per token
        out.append((math.log(2) / rate).tolist())
    return out


def train(model, data: bytes, args, log) -> list[dict]:
    ids = torch.tensor(list(data), dtype=torch.long)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    rng = random.Random(args.seed)
    history, step, t0 = [], 0, time.time()
    model.train()
    while time.time() - t0 < args.minutes * 60 and step < args.max_steps:
        starts = [rng.randrange(0, len(ids) - args.train_length - 1) for _ in range(args.batch)]
        batch = torch.stack([ids[s : s + args.train_length] for s in starts])
        lr = args.lr * min(1.0, (step + 1) / 200)
        for group in opt.param_groups:
            group["lr"] = lr
        loss = model(batch, labels=batch, use_cache=False).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 100 == 0:
            history.append({"step": step, "loss": loss.item(), "seconds": time.time() - t0})
            log(f"step {step} loss {loss.item():.3f} ({time.time() - t0:.0f} s)")
        step += 1
    model.eval()
    history.append({"step": step, "loss": loss.item(), "seconds": time.time() - t0})
    return history


def _round(obj):
    if isinstance(obj, float):
        return float(f"{obj:.4g}")
    if isinstance(obj, list):
        return [_round(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _round(v) for k, v in obj.items()}
    return obj


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", type=Path, default=DEFAULT_DATA)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out")
    p.add_argument("--train_length", type=int, default=64)
    p.add_argument("--d_model", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--head_dim", type=int, default=32)
    p.add_argument("--state_size", type=int, default=64)
    p.add_argument("--long_heads", type=int, default=4, help="heads per layer given long memory (frozen)")
    p.add_argument("--long_half_life", type=float, default=4096.0)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--minutes", type=float, default=8.0)
    p.add_argument("--max_steps", type=int, default=100000)
    p.add_argument("--eval_tokens", type=int, default=32768)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip_train", action="store_true", help="reuse out/model")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    log_file = open(args.out / "log.txt", "a")

    def log(msg):
        print(msg, flush=True)
        log_file.write(msg + "\n")
        log_file.flush()

    log(f"== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(sys.argv)}")
    train_texts, held_texts = load_speeches(args.data_dir)
    train_data = b"\n\n".join(train_texts)
    held = b"\n\n".join(held_texts)
    log(f"training bytes {len(train_data)}, held-out bytes {len(held)} (5 most recent State of the Union speeches)")
    eval_ids = torch.tensor([list(held[: args.eval_tokens])])

    if args.skip_train:
        model = RobustMamba2ForCausalLM.from_pretrained(args.out / "model").eval()
        history = json.loads((args.out / "train_history.json").read_text())
    else:
        model = build_model(args)
        freeze_long_heads(model, args.long_heads)
        history = train(model, train_data, args, log)
        model.save_pretrained(args.out / "model")
        (args.out / "train_history.json").write_text(json.dumps(history))
        # what emergent_eval.py reads (`--runs <out> --calibrate_on speeches`): the statistics with intervals
        (args.out / "run_args.json").write_text(json.dumps({k: str(v) if isinstance(v, Path) else v
                                                            for k, v in vars(args).items()}, indent=2))  # fmt: skip
    hl = half_lives(model, eval_ids[:, :4096])
    log("half-lives (tokens) per layer/head: " + json.dumps([[round(v) for v in row] for row in hl]))

    # calibration: training text only, windows of T_train tokens, every 16 tokens inside them
    rng = random.Random(1)
    starts = [rng.randrange(0, len(train_data) - args.train_length) for _ in range(64)]
    calib = torch.tensor([list(train_data[s : s + args.train_length]) for s in starts])
    caps = calibrate_state_norms(model, calib, margin=1.0, every=16)
    log("calibrated state_norm_max (layer x head): " + json.dumps([[round(v, 2) for v in row] for row in caps]))

    variants = {
        "no mitigation": {},
        "decay_scale=4": {"decay_scale": 4.0},
        "insertion_scale=0.5": {"insertion_scale": 0.5},
        "state_norm_max calibrated, every 16": {"state_norm_max": caps, "state_norm_every": 16},
        f"sliding_window={args.train_length}": {"sliding_window": args.train_length},
    }
    defaults = dict(
        insertion_scale=1.0, decay_scale=1.0, state_norm_max=None, state_norm_every=128, sliding_window=None
    )
    results = {}
    for name, mit in variants.items():
        for k, v in {**defaults, **mit}.items():
            setattr(model.config, k, v)
        model.config.check_mitigations()
        t = time.time()
        res = position_loss(model, eval_ids, bucket_size=args.train_length, stats_every=64, progress=False)
        results[name] = res

        def mean_loss(lo, hi, res=res):  # count-weighted mean over buckets inside [lo, hi)
            bs = [b for b in res["buckets"] if b["start"] >= lo and b["end"] <= hi and b["count"]]
            return sum(b["mean_loss"] * b["count"] for b in bs) / sum(b["count"] for b in bs)

        norm_end = max(max(row) for row in res["state_norm"][-1])
        log(
            f"{name}: loss within T_train {mean_loss(0, args.train_length):.3f}, "
            f"{args.train_length}-1K {mean_loss(args.train_length, 1024):.3f}, 1K-4K {mean_loss(1024, 4096):.3f}, "
            f"last half {mean_loss(args.eval_tokens // 2, args.eval_tokens):.3f}; "
            f"max state norm at end {norm_end:.1f} ({time.time() - t:.0f} s)"
        )
    # kept small for the repository: per-head norms only (no mean/variance), 4 significant digits
    slim = {k: {f: v for f, v in r.items() if f not in ("state_mean", "state_var")} for k, r in results.items()}
    record = {"args": {k: str(v) for k, v in vars(args).items()}, "half_lives": hl, "caps": caps, "results": slim}
    (args.out / "position_loss.json").write_text(json.dumps(_round(record)))
    plot_position_loss(results, args.out / "position_loss.png", args.train_length,
                       title=f"byte-level Mamba-2, T_train={args.train_length}, held-out speeches")  # fmt: skip
    plot_state_norms(results, args.out / "state_norms.png", args.train_length, title="state norms (held-out text)")

    tok = ByteTokenizer()
    grids = {}
    for name in ("no mitigation", f"sliding_window={args.train_length}"):
        for k, v in {**defaults, **variants[name]}.items():
            setattr(model.config, k, v)
        grid = run_passkey(model, tok, [256, 1024, 4096], [0.0, 0.5, 1.0], trials=2, max_new_tokens=8, progress=False)
        grids[name] = grid
        log(f"passkey {name}: {grid['accuracy']}")
        slug = "none" if name == "no mitigation" else "window"
        plot_passkey(grid, args.out / f"passkey_{slug}.png", title=f"passkey, {name}")
    (args.out / "passkey.json").write_text(json.dumps(grids, indent=1))
    log("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
