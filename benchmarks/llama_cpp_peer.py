"""RobustMamba2 decode and prefill against llama.cpp, the CPU peer, on the same random 130m-shaped Mamba-2.

Optional, not part of CI (it compiles llama.cpp: about 5 minutes on 2 cores, once). Only timings from an idle machine
count: llama.cpp's and torch's threads both spin and collapse when anything else runs.

    python benchmarks/llama_cpp_peer.py [--threads 1,2] [--repeats 5] [--llama-dir ~/.cache/hf_collapse/llama_cpp]

What it does, in one run:
1. llama.cpp from the source inside the ``llama-cpp-python`` sdist (``pip download --no-deps --no-binary :all:
   llama-cpp-python`` into ``--llama-dir`` unless an sdist or a build is already there), ``cmake`` on
   ``vendor/llama.cpp``, target ``llama-bench`` only (native CPU flags, no HTTPS, no tests).
2. A random transformers ``Mamba2ForCausalLM`` with the layer shapes of mamba2-130m (seed 0), saved with
   ``save_pretrained`` and converted by llama.cpp's own ``convert_hf_to_gguf.py`` (with the ``gguf-py`` that ships
   beside it) to f32 and f16 GGUF files.
3. ``llama-bench -p 512 -n 128 -r <repeats>`` at each thread count: prompt processing (pp512) and token generation
   (tg128) tokens/s.
4. Ours in this process on the same weights (``RobustMamba2ForCausalLM.from_mamba2``), threads pinned: the median
   cached greedy decode step at batch 1 (what ``tg`` measures) in fp32 and bf16, eager and with
   ``compile_decode()`` (the first compiled step, which compiles, is a warm-up outside the timing), and a 512-token
   prefill, fp32 and bf16 (what ``pp`` measures).

Printed ratios are ours / llama.cpp in tokens/s (higher is better for ours): fp32 against f32 and bf16 against f16,
at the same thread count. Results are appended to ``benchmarks/results/llama_cpp_peer.jsonl``.
"""

from __future__ import annotations

import argparse
import copy
import glob
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import RESULTS  # noqa: E402
from robust_mamba2 import M130, _decode_stepper, _pair  # noqa: E402

DEFAULT_DIR = Path.home() / ".cache" / "hf_collapse" / "llama_cpp"


def llama_source(root: Path) -> Path:
    """The ``vendor/llama.cpp`` folder of the llama-cpp-python sdist, downloaded and unpacked into ``root`` if needed."""
    found = sorted(glob.glob(str(root / "llama_cpp_python-*" / "vendor" / "llama.cpp")))
    if found:
        return Path(found[-1])
    root.mkdir(parents=True, exist_ok=True)
    sdists = sorted(glob.glob(str(root / "llama_cpp_python-*.tar.gz")))
    if not sdists:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        "llama-cpp-python", "-d", str(root)], check=True)  # fmt: skip
        sdists = sorted(glob.glob(str(root / "llama_cpp_python-*.tar.gz")))
    with tempfile.TemporaryDirectory(dir=root) as tmp:  # unpack beside, then move: no half-unpacked tree survives
        with tarfile.open(sdists[-1]) as tar:
            tar.extractall(tmp, filter="data")
        (inner,) = Path(tmp).iterdir()
        os.replace(inner, root / inner.name)
    return llama_source(root)


def build_llama_bench(src: Path, jobs: int) -> Path:
    """``llama-bench`` built from ``src`` (cached in ``src/build-peer``)."""
    build = src / "build-peer"
    exe = build / "bin" / "llama-bench"
    if exe.exists():
        return exe
    subprocess.run(["cmake", "-S", str(src), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON",
                    "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
                    "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF"], check=True)  # fmt: skip
    subprocess.run(["cmake", "--build", str(build), "--target", "llama-bench", "-j", str(jobs)], check=True)
    return exe


def convert(src: Path, model_dir: Path, outtype: str) -> Path:
    """``model_dir`` converted by llama.cpp's own converter to a GGUF file of ``outtype`` (f32, f16)."""
    out = model_dir / f"model-{outtype}.gguf"
    if not out.exists():
        env = {**os.environ, "PYTHONPATH": str(src / "gguf-py") + os.pathsep + os.environ.get("PYTHONPATH", "")}
        subprocess.run([sys.executable, str(src / "convert_hf_to_gguf.py"), str(model_dir), "--outtype", outtype,
                        "--outfile", str(out)], check=True, env=env)  # fmt: skip
    return out


def llama_bench(exe: Path, gguf: Path, threads: int, repeats: int) -> dict[str, float]:
    """llama.cpp's pp512 and tg128 tokens/s (mean over ``repeats``) at ``threads`` threads."""
    res = subprocess.run([str(exe), "-m", str(gguf), "-p", "512", "-n", "128", "-t", str(threads), "-r", str(repeats),
                          "-o", "json"], check=True, capture_output=True, text=True)  # fmt: skip
    rows = json.loads(res.stdout)
    out = {}
    for row in rows:
        key = "pp512" if row["n_prompt"] > 0 else "tg128"
        out[key] = float(row["avg_ts"])
    return out


def ours_decode_tok_s(model, steps: int, repeats: int) -> float:
    """Median tokens/s of cached greedy decode steps at batch 1 (after a warm-up call)."""
    run = _decode_stepper(model, torch.randint(0, M130["vocab_size"], (1, 8)), steps)
    run()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return steps / statistics.median(times)


def ours_prefill_tok_s(model, repeats: int, length: int = 512) -> float:
    """Median tokens/s of one ``length``-token forward that fills the cache (llama.cpp's ``pp``)."""
    ids = torch.randint(0, M130["vocab_size"], (1, length))
    times = []
    with torch.no_grad():
        model(ids, use_cache=True, logits_to_keep=1)
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(ids, use_cache=True, logits_to_keep=1)
            times.append(time.perf_counter() - t0)
    return length / statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--llama-dir", type=Path, default=DEFAULT_DIR)
    parser.add_argument("--build-jobs", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            raise SystemExit(f"`{tool}` not found: building llama.cpp needs cmake and a C++ compiler")

    src = llama_source(args.llama_dir)
    exe = build_llama_bench(src, args.build_jobs)
    hf, ours32 = _pair(M130)
    model_dir = args.llama_dir / "mamba2-130m-shaped-random"
    if not (model_dir / "config.json").exists():
        tmp = Path(tempfile.mkdtemp(dir=args.llama_dir))
        hf.save_pretrained(tmp)
        os.replace(tmp, model_dir)
    ggufs = {"f32": convert(src, model_dir, "f32"), "f16": convert(src, model_dir, "f16")}
    del hf
    ours16 = copy.deepcopy(ours32).to(torch.bfloat16)  # the same weights, without building a second pair
    compiled32, compiled16 = copy.deepcopy(ours32).compile_decode(), copy.deepcopy(ours16).compile_decode()

    RESULTS.mkdir(exist_ok=True)
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        peer = {kind: llama_bench(exe, path, threads, args.repeats) for kind, path in ggufs.items()}
        mine = {
            "fp32": {"tg128": ours_decode_tok_s(ours32, args.decode_steps, args.repeats),
                     "pp512": ours_prefill_tok_s(ours32, args.repeats)},
            "bf16": {"tg128": ours_decode_tok_s(ours16, args.decode_steps, args.repeats),
                     "pp512": ours_prefill_tok_s(ours16, args.repeats)},
            # compile_decode() changes only the one-token step (the first call compiles, outside the timing)
            "fp32_compiled": {"tg128": ours_decode_tok_s(compiled32, args.decode_steps, args.repeats)},
            "bf16_compiled": {"tg128": ours_decode_tok_s(compiled16, args.decode_steps, args.repeats)},
        }  # fmt: skip
        print(f"threads {threads}:")
        pairs = (("fp32", "f32"), ("bf16", "f16"), ("fp32_compiled", "f32"), ("bf16_compiled", "f16"))
        for ours_kind, peer_kind in pairs:
            for test in mine[ours_kind]:
                a, b = mine[ours_kind][test], peer[peer_kind][test]
                print(f"  {test} ours {ours_kind} {a:.1f} tok/s / llama.cpp {peer_kind} {b:.1f} tok/s = {a / b:.2f}x")
                record = {"name": f"{test}_{ours_kind}_vs_llama_cpp_{peer_kind}", "threads": threads,
                          "ours_tok_s": a, "llama_cpp_tok_s": b, "ratio": a / b, "repeats": args.repeats,
                          "torch": torch.__version__, "llama_cpp_source": src.parent.parent.name,
                          "time": time.strftime("%Y-%m-%dT%H:%M:%S")}  # fmt: skip
                with open(RESULTS / "llama_cpp_peer.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
