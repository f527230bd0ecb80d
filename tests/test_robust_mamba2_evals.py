"""Long-context evaluations: passkey prompt and grid, streamed position loss and state statistics, CLI outputs."""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F

from hf_collapse import RobustMamba2Config, RobustMamba2ForCausalLM
from hf_collapse.cli import main as cli_main
from hf_collapse.evals.common import ByteTokenizer
from hf_collapse.evals.passkey import FILLER, QUESTION, build_passkey_prompt, run_passkey
from hf_collapse.evals.position_loss import position_loss

torch.set_num_threads(1)

BYTE_MODEL = dict(
    num_heads=4,
    head_dim=8,
    hidden_size=16,
    state_size=8,
    n_groups=1,
    num_hidden_layers=2,
    vocab_size=256,
    chunk_size=16,
    pad_token_id=0,
    eos_token_id=None,
    bos_token_id=None,
)


def _model(**kw):
    torch.manual_seed(0)
    return RobustMamba2ForCausalLM(RobustMamba2Config(**BYTE_MODEL, **kw)).eval()


def test_passkey_prompt_layout_and_length():
    tok = ByteTokenizer()
    for length, depth in [(600, 0.0), (600, 0.5), (1000, 1.0)]:
        ids = build_passkey_prompt(tok, length, depth, "12345")
        text = tok.decode(ids)
        assert len(ids) <= length and len(ids) > length - len(" " + FILLER)
        assert text.startswith("There is an important info hidden inside a lot of irrelevant text.")
        assert text.endswith(QUESTION)
        assert text.count("12345") == 2
        needle_at = text.index("The passkey is 12345")
        if depth == 0.0:
            assert needle_at < len(text) * 0.2
        if depth == 1.0:
            assert needle_at > len(text) * 0.8


def test_run_passkey_grid():
    result = run_passkey(_model(), ByteTokenizer(), [300, 500], [0.0, 1.0], trials=2, max_new_tokens=6, progress=False)
    assert len(result["accuracy"]) == 2 and all(len(row) == 2 for row in result["accuracy"])
    assert len(result["trials"]) == 8 and all(0 <= r["prompt_tokens"] <= r["length"] for r in result["trials"])


def test_position_loss_streaming_matches_full_forward():
    model = _model(sliding_window=8)
    ids = torch.randint(0, 256, (2, 100), generator=torch.Generator().manual_seed(0))
    res = position_loss(model, ids, bucket_size=32, stats_every=16, progress=False)
    with torch.no_grad():
        logits = model(ids).logits
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, 256), ids[:, 1:].reshape(-1), reduction="none").view(2, 99)
    for b in res["buckets"]:
        lo, hi = max(b["start"], 1), b["end"]
        expected = nll[:, lo - 1 : hi - 1].mean().item()
        assert abs(b["mean_loss"] - expected) < 1e-4
        assert b["count"] == 2 * (hi - lo)
    assert res["stats_positions"] == [16, 32, 48, 64, 80, 96, 100]
    assert len(res["state_norm"][0]) == 2 and len(res["state_norm"][0][0]) == 4


def test_cli_passkey_and_position_loss(tmp_path):
    model = _model()
    model.save_pretrained(tmp_path / "model")
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 20)
    rc = cli_main(
        ["passkey", "--model", str(tmp_path / "model"), "--tokenizer", "bytes", "--lengths", "300,400",
         "--depths", "0,1", "--max_new_tokens", "6", "--output_dir", str(tmp_path / "pk"), "--sliding_window", "64"]
    )  # fmt: skip
    assert rc == 0
    grid = json.loads((tmp_path / "pk" / "passkey.json").read_text())
    assert grid["lengths"] == [300, 400] and grid["args"]["sliding_window"] == 64
    assert (tmp_path / "pk" / "passkey.png").stat().st_size > 0
    rc = cli_main(
        ["position-loss", "--model", str(tmp_path / "model"), "--tokenizer", "bytes", "--text_file", str(text),
         "--max_tokens", "500", "--bucket_size", "100", "--stats_every", "50", "--train_length", "64",
         "--output_dir", str(tmp_path / "pl")]
    )  # fmt: skip
    assert rc == 0
    res = json.loads((tmp_path / "pl" / "position_loss.json").read_text())
    assert res["tokens"] == 500 and len(res["buckets"]) == 5 and len(res["stats_positions"]) == 10
    for name in ("position_loss.png", "state_norms.png"):
        assert (tmp_path / "pl" / name).stat().st_size > 0
