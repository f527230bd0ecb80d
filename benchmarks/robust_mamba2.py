"""RobustMamba2 vs transformers' Mamba2ForCausalLM (same weights, same process): prefill, memory, decode.

    python benchmarks/robust_mamba2.py [--threads 2] [--parts prefill,memory,latency,decode,decode_step,train_step]
        [--repeats 5]

Parts (issue 3, "Performance"):
- prefill: forward over 4096 tokens (``use_cache=True, logits_to_keep=1``, i.e. a generation prefill), a tiny
  config and a 130m-shaped one (mamba2-130m layer shapes: d=768, 24 heads × 64, state 128, n_groups 1, vocab 50288;
  2 of its 24 layers, since the ratio does not depend on depth and 24 layers at 4K take over a minute a forward on 2 CPU
  threads). Mitigations off, then each on. Ratio = baseline time / ours time is printed as "speed".
- memory: peak RSS increase of a 256K-token forward (tiny config, ``logits_to_keep=1``) over a 16K-token one, each in
  a fresh subprocess; also transformers at both lengths.
- latency: per-token decode latency (tiny config) at position 64K vs 1K, mitigations off, ``state_norm_max``
  and ``sliding_window``.
- decode: ``generate()`` tokens/s at batch 1 (130m-shaped, all 24 layers; 8-token prompt, 16 new tokens, prefill
  included) vs transformers, next to the memory-bandwidth limit (fp32 weight bytes / measured copy bandwidth).
- train_step: one training step (forward + backward, batch 16 × 128 tokens, no cache) of the large-state byte-level
  model of the emergent-collapse experiment (hidden 128, 2 layers, expand 8, 16 heads × 64, state 1024: 2.1M state
  elements), ours (short segments through the quadratic scan) vs ours forced onto the chunk scan vs transformers.
- decode_step: one cached greedy decode step at batch 1 (130m-shaped, 24 layers; what llama.cpp's ``tg`` measures), fp32
  and bf16, ours vs transformers, next to the weight-read bound measured in the same process: the bytes a step
  actually reads (all weights but the input embedding, of which one row) over a matrix-vector product's read
  bandwidth (256 MiB matrix).

Each timing is the median of ``--repeats`` interleaved runs (``_common.interleaved_median``); results are appended to
``benchmarks/results/robust_mamba2.jsonl``. In the printed ``ratio`` lines ours/baseline is a time ratio (lower is
faster); the ``speed`` figures are baseline/ours (higher is faster).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import interleaved_median, report  # noqa: E402

SCRIPT = "robust_mamba2"

TINY = dict(
    hidden_size=64, num_hidden_layers=2, num_heads=4, head_dim=32, state_size=16, n_groups=1, vocab_size=256,
    chunk_size=256,
)  # fmt: skip
M130 = dict(
    hidden_size=768, num_hidden_layers=24, num_heads=24, head_dim=64, state_size=128, n_groups=1, vocab_size=50288,
    chunk_size=256,
)  # fmt: skip
OFF = dict(insertion_scale=1.0, decay_scale=1.0, state_norm_max=None, state_norm_every=128, sliding_window=None)
MITIGATIONS = {
    "off": {},
    "scales": dict(insertion_scale=0.5, decay_scale=1.5),
    "state_norm_max": dict(state_norm_max=1.0, state_norm_every=128),
    "sliding_window": dict(sliding_window=1024),
}


def _pair(shape: dict, **mitigations):
    """A random transformers Mamba2ForCausalLM and our model with the same weights."""
    from transformers import Mamba2Config, Mamba2ForCausalLM

    import hf_collapse  # noqa: F401
    from hf_collapse import RobustMamba2ForCausalLM

    torch.manual_seed(0)
    hf = Mamba2ForCausalLM(Mamba2Config(**shape)).eval()
    ours = RobustMamba2ForCausalLM.from_mamba2(hf, **mitigations).eval()
    return hf, ours


def bench_prefill(args):
    ids_cache = {}
    for shape_name, shape in (("tiny", TINY), ("130m-shaped-2-layers", {**M130, "num_hidden_layers": 2})):
        hf, ours = _pair(shape)
        ids = ids_cache.setdefault(shape["vocab_size"], torch.randint(0, shape["vocab_size"], (1, 4096)))
        for mit_name, mit in MITIGATIONS.items():
            for key, value in {**OFF, **mit}.items():
                setattr(ours.config, key, value)
            ours.config.check_mitigations()

            def run_ours(m=ours, x=ids):
                with torch.no_grad():
                    m(x, use_cache=True, logits_to_keep=1)

            def run_hf(m=hf, x=ids):
                with torch.no_grad():
                    m(x, use_cache=True, logits_to_keep=1)

            o, b = interleaved_median(run_ours, run_hf, repeats=args.repeats)
            report(SCRIPT, f"prefill_4096_{shape_name}_{mit_name}", o, b, args.repeats, args.threads,
                   speed=b / o, tokens=4096)  # fmt: skip
            print(f"  speed vs transformers: {b / o:.2f}x")
        del hf, ours


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _memory_child(which: str, length: int) -> None:
    """Run in a fresh process: peak RSS increase (MB) during one forward of ``length`` tokens.

    RSS is sampled every millisecond by a thread (``ru_maxrss`` would also count building the model)."""
    import threading

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    hf, ours = _pair(TINY)
    model = ours if which == "ours" else hf
    del hf, ours
    ids = torch.randint(0, TINY["vocab_size"], (1, length))
    with torch.no_grad():
        model(ids[:, :512], logits_to_keep=1)  # warm up allocator, kernels, lazy imports
        before = _rss_mb()
        peak = [before]
        done = threading.Event()

        def sample():
            while not done.is_set():
                peak[0] = max(peak[0], _rss_mb())
                time.sleep(0.001)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        t0 = time.perf_counter()
        model(ids, logits_to_keep=1, use_cache=False)
        seconds = time.perf_counter() - t0
        done.set()
        sampler.join()
    print(json.dumps({"peak_increase_mb": max(peak[0], _rss_mb()) - before, "seconds": seconds}))


def _memory_run(which: str, length: int, threads: int, limit_gb: float) -> dict:
    # A fixed mmap threshold makes glibc return freed tensors >= 1 MiB to the OS at once, so the peak RSS follows the
    # live tensors; with the default dynamic threshold, heap fragmentation adds a few tens of MB that vary run to run.
    env = {**os.environ, "BENCH_THREADS": str(threads), "MALLOC_MMAP_THRESHOLD_": str(2**20)}
    cmd = [sys.executable, __file__, "--memory-child", which, str(length)]

    def limit():  # an address-space cap so a runaway baseline fails instead of taking the machine
        cap = int(limit_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, preexec_fn=limit, timeout=1200)
    for line in proc.stdout.splitlines()[::-1]:
        if line.startswith("{"):
            return json.loads(line)
    err = (proc.stderr.strip().splitlines() or ["?"])[-1]
    return {"error": err[:200]}


def bench_memory(args):
    results = {}
    for which in ("ours", "transformers"):
        for length in (16384, 262144):
            res = _memory_run(which, length, args.threads, args.memory_limit_gb)
            results[(which, length)] = res
            print(f"memory {which} {length} tokens: {res}")
    o16, o256 = results[("ours", 16384)], results[("ours", 262144)]
    if "error" not in o16 and "error" not in o256:
        # the memory figure goes through report() with MB in place of seconds
        report(SCRIPT, "peak_rss_mb_256k_over_16k_ours", o256["peak_increase_mb"], o16["peak_increase_mb"], 1,
               args.threads, unit="MB", transformers={f"{k[1]}": v for k, v in results.items() if k[0] == "transformers"},
               ours={f"{k[1]}": v for k, v in results.items() if k[0] == "ours"})  # fmt: skip


def bench_latency(args):
    from hf_collapse.modeling.robust_mamba2 import RobustMamba2Cache

    for mit_name in ("off", "state_norm_max", "sliding_window"):
        _, ours = _pair(TINY, **MITIGATIONS[mit_name])
        caches = {}
        for pos in (1024, 65536):
            ids = torch.randint(0, TINY["vocab_size"], (1, pos))
            cache = RobustMamba2Cache(config=ours.config)
            with torch.no_grad():
                ours(ids, cache=cache, use_cache=True, logits_to_keep=1)
            caches[pos] = cache
        tok = torch.randint(0, TINY["vocab_size"], (1, 1))

        def step(cache, m=ours, x=tok):
            def run():
                with torch.no_grad():
                    m(x, cache=cache, use_cache=True)

            return run

        # each repeat times 50 steps so a figure is well above timer and scheduler noise
        def many(cache):
            one = step(cache)

            def run():
                for _ in range(50):
                    one()

            return run

        late, early = interleaved_median(many(caches[65536]), many(caches[1024]), repeats=args.repeats)
        report(SCRIPT, f"decode_latency_64k_over_1k_{mit_name}", late / 50, early / 50, args.repeats, args.threads,
               positions=[65536, 1024])  # fmt: skip


def _copy_bandwidth(threads: int) -> float:
    src = torch.empty(2**28 // 4, dtype=torch.float32).normal_()  # 256 MiB
    dst = torch.empty_like(src)
    times = []
    for _ in range(7):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return src.numel() * 4 / statistics.median(times)  # bytes copied per second


def bench_decode(args):
    hf, ours = _pair(M130)
    ids = torch.randint(0, M130["vocab_size"], (1, 8))
    new = 16
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)

    def run_ours():
        with torch.no_grad():
            ours.generate(ids, **kw)

    def run_hf():
        with torch.no_grad():
            hf.generate(ids, **kw)

    o, b = interleaved_median(run_ours, run_hf, repeats=args.repeats)
    weight_bytes = sum(p.numel() * p.element_size() for p in ours.parameters())
    bandwidth = _copy_bandwidth(args.threads)
    limit = bandwidth / weight_bytes
    report(SCRIPT, "generate_16_tokens_130m_batch1", o, b, args.repeats, args.threads, ours_tok_s=new / o,
           transformers_tok_s=new / b, speed=b / o, weight_mb=weight_bytes / 1e6, copy_gb_s=bandwidth / 1e9,
           bandwidth_limit_tok_s=limit)  # fmt: skip
    print(
        f"  ours {new / o:.1f} tok/s, transformers {new / b:.1f} tok/s ({b / o:.2f}x); bandwidth limit "
        f"{limit:.0f} tok/s ({weight_bytes / 1e6:.0f} MB fp32 weights at {bandwidth / 1e9:.1f} GB/s copy)"
    )


def _gemv_bandwidth(threads: int, dtype: torch.dtype) -> float:
    """Bytes of matrix read per second by a matrix-vector product over a 256 MiB matrix (the decode kernel)."""
    rows = 2**28 // (4096 * torch.tensor([], dtype=dtype).element_size())
    w = torch.empty(rows, 4096, dtype=dtype).normal_()
    x = torch.empty(4096, dtype=dtype).normal_()
    times = []
    for _ in range(9):
        t0 = time.perf_counter()
        torch.mv(w, x)
        times.append(time.perf_counter() - t0)
    return w.numel() * w.element_size() / statistics.median(times)


def _read_bandwidth(dtype: torch.dtype) -> float:
    """Bytes per second of a plain reduction over a 256 MiB matrix: what reading the weights once costs."""
    w = torch.empty(2**28 // torch.tensor([], dtype=dtype).element_size(), dtype=dtype).normal_()
    times = []
    for _ in range(9):
        t0 = time.perf_counter()
        w.sum()
        times.append(time.perf_counter() - t0)
    return w.numel() * w.element_size() / statistics.median(times)


def _bytes_read_per_token(model) -> int:
    """Weight bytes one decode step reads: everything but the input embedding, of which it reads one row."""
    emb = model.get_input_embeddings().weight
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    tied = model.get_output_embeddings().weight.data_ptr() == emb.data_ptr()
    return total - (0 if tied else emb.numel() * emb.element_size()) + emb.shape[1] * emb.element_size()


def _decode_stepper(model, prompt: torch.Tensor, steps: int):
    """A callable running `steps` cached greedy decode steps, continuing where the previous call stopped."""
    with torch.no_grad():
        out = model(prompt, use_cache=True, logits_to_keep=1)
    state = {"cache": out.cache, "tok": out.logits[:, -1:].argmax(-1)}

    def run():
        with torch.no_grad():
            for _ in range(steps):
                o = model(state["tok"], cache=state["cache"], use_cache=True, logits_to_keep=1)
                state["tok"] = o.logits[:, -1:].argmax(-1)

    return run


def bench_decode_step(args):
    """One cached greedy decode step at batch 1 (the llama.cpp `tg` measurement), fp32 and bf16: ours (eager and
    with ``compile_decode()``) vs transformers, beside the weight-read bound measured in this process."""
    import copy

    hf32, ours32 = _pair(M130)
    for dtype in (torch.float32, torch.bfloat16):
        hf, ours = (hf32, ours32) if dtype == torch.float32 else (hf32.to(dtype), ours32.to(dtype))
        compiled = copy.deepcopy(ours).compile_decode()
        prompt = torch.randint(0, M130["vocab_size"], (1, 8))
        t0 = time.perf_counter()
        _decode_stepper(compiled, prompt, 1)()  # compiles (inductor's on-disk cache makes later runs faster)
        compile_s = time.perf_counter() - t0
        o, b = interleaved_median(_decode_stepper(ours, prompt, args.decode_steps),
                                  _decode_stepper(hf, prompt, args.decode_steps), repeats=args.repeats)  # fmt: skip
        c, o2 = interleaved_median(_decode_stepper(compiled, prompt, args.decode_steps),
                                   _decode_stepper(ours, prompt, args.decode_steps), repeats=args.repeats)  # fmt: skip
        o, b, c, o2 = (v / args.decode_steps for v in (o, b, c, o2))
        read = _bytes_read_per_token(ours)
        bw = _gemv_bandwidth(args.threads, dtype)
        rd = _read_bandwidth(dtype)
        name = "fp32" if dtype == torch.float32 else "bf16"
        report(SCRIPT, f"decode_step_130m_batch1_{name}", o, b, args.repeats, args.threads, ours_tok_s=1 / o,
               transformers_tok_s=1 / b, bytes_read_mb=read / 1e6, gemv_gb_s=bw / 1e9, bound_tok_s=bw / read,
               ours_over_bound=(1 / o) / (bw / read))  # fmt: skip
        report(SCRIPT, f"decode_step_130m_batch1_{name}_compiled_vs_eager", c, o2, args.repeats, args.threads,
               compiled_tok_s=1 / c, eager_tok_s=1 / o2, transformers_tok_s=1 / b, compile_s=compile_s,
               read_gb_s=rd / 1e9, read_bound_tok_s=rd / read, compiled_over_read_bound=(1 / c) / (rd / read))  # fmt: skip
        print(f"  {name}: ours {1 / o:.1f} tok/s, transformers {1 / b:.1f} tok/s ({b / o:.2f}x); weight-read bound "
              f"{bw / read:.1f} tok/s ({read / 1e6:.0f} MB read per token at {bw / 1e9:.1f} GB/s gemv), ours at "
              f"{(1 / o) / (bw / read):.2f} of it")  # fmt: skip
        print(f"  {name} compile_decode(): {1 / c:.1f} tok/s = {o2 / c:.2f}x our eager step, {b / c:.2f}x "
              f"transformers; plain-read bound {rd / read:.1f} tok/s ({rd / 1e9:.1f} GB/s), compiled at "
              f"{(1 / c) / (rd / read):.2f} of it (first step, compiling: {compile_s:.0f} s)")  # fmt: skip
    # int8 weights with torch's dynamic quantization (every Linear, LM head included) against our fp32
    import warnings

    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours8 = quantize_dynamic(_pair(M130)[1], {torch.nn.Linear}, dtype=torch.qint8)
    prompt = torch.randint(0, M130["vocab_size"], (1, 8))
    o, b = interleaved_median(_decode_stepper(ours8, prompt, args.decode_steps),
                              _decode_stepper(ours32, prompt, args.decode_steps), repeats=args.repeats)  # fmt: skip
    o, b = o / args.decode_steps, b / args.decode_steps
    report(SCRIPT, "decode_step_130m_batch1_int8_dynamic_vs_fp32", o, b, args.repeats, args.threads,
           ours_tok_s=1 / o, fp32_tok_s=1 / b)  # fmt: skip
    print(f"  int8 (dynamic): {1 / o:.1f} tok/s, {b / o:.2f}x our fp32")


LARGE_STATE = dict(
    hidden_size=128, num_hidden_layers=2, expand=8, num_heads=16, head_dim=64, state_size=1024, n_groups=1,
    vocab_size=256, chunk_size=256,
)  # fmt: skip


def bench_train_step(args):
    import dataclasses

    from hf_collapse.modeling.robust_mamba2 import resolve_kernels

    hf, ours = _pair(LARGE_STATE)
    _, chunked = _pair(LARGE_STATE)
    chunk_only = dataclasses.replace(resolve_kernels(), quadratic_max=0)
    for block in chunked.backbone.layers:
        block.mixer.kernel_functions = chunk_only

    def step(model, ids):
        def run():
            model.train()
            model.zero_grad(set_to_none=True)
            model(ids, labels=ids).loss.backward()

        return run

    # the emergent-collapse runs: 16 x 128 (one quadratic piece) and the longer-trained control, 2 x 1024 (four
    # pieces chained through the state); the same 2,048 tokens per step
    for batch, length in ((16, 128), (2, 1024)):
        ids = torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(0))
        for name, base in (("chunk_scan", chunked), ("transformers", hf)):
            o, b = interleaved_median(step(ours, ids), step(base, ids), repeats=args.repeats)
            report(SCRIPT, f"train_step_{batch}x{length}_large_state_vs_{name}", o, b, args.repeats, args.threads,
                   speed=b / o)  # fmt: skip
            print(f"  {batch}x{length}: {o:.2f} s/step, speed vs {name}: {b / o:.2f}x")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--parts", default="prefill,memory,latency,decode,decode_step,train_step")
    parser.add_argument("--decode-steps", type=int, default=20, help="decode steps per timed repeat (decode_step)")
    parser.add_argument("--memory-limit-gb", type=float, default=12.0)
    parser.add_argument("--memory-child", nargs=2, metavar=("WHICH", "LENGTH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_child:
        _memory_child(args.memory_child[0], int(args.memory_child[1]))
        return 0
    parts = {p.strip() for p in args.parts.split(",")}
    print(f"torch {torch.__version__}, {args.threads} threads, {args.repeats} repeats")
    for name, fn in (("prefill", bench_prefill), ("memory", bench_memory), ("latency", bench_latency),
                     ("decode", bench_decode), ("decode_step", bench_decode_step),
                     ("train_step", bench_train_step)):  # fmt: skip
        if name in parts:
            print(f"== {name}")
            fn(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
