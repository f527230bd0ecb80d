"""Hub distribution: model cards, remote-code export without hf-collapse, safe save/load, push (HTTP mocked)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from transformers import ResNetConfig

from hf_collapse import DualHeadForImageClassification
from hf_collapse.hub import CARD_KINDS, export_for_hub, make_model_card, push
from hf_collapse.modeling.checkpoint_utils import CorruptCheckpointError


def tiny_model():
    cfg = ResNetConfig(num_channels=1, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic")
    return DualHeadForImageClassification.from_backbone(cfg, num_labels=3).eval()


@pytest.mark.parametrize("kind", sorted(CARD_KINDS))
def test_model_card_round_trips_with_required_yaml(kind, tmp_path):
    card = make_model_card(
        kind, model_id="m", base_model="org/base", datasets=["fashion_mnist"], metrics=["accuracy"],
        eval_results=[{"task_type": "image-classification", "dataset_type": "fashion_mnist",
                       "dataset_name": "Fashion-MNIST", "metric_type": "accuracy", "metric_value": 0.9}],
        results_table="| a | b |\n|---|---|\n| 1 | 2 |",
    )  # fmt: skip
    card.save(tmp_path / "README.md")
    data = ModelCard.load(tmp_path / "README.md").data.to_dict()
    for key in ("library_name", "tags", "base_model", "datasets", "metrics", "pipeline_tag", "license", "model-index"):
        assert key in data, key
    assert data["library_name"] == "hf-collapse" and "hf-collapse" in data["tags"]
    assert data["model-index"][0]["results"][0]["metrics"][0]["value"] == 0.9
    text = (tmp_path / "README.md").read_text()
    assert "pip install hf-collapse" in text and "import hf_collapse" in text and "| 1 | 2 |" in text
    assert "@" in text and "Limitations" in text  # citation and limitations sections


def test_unknown_card_kind():
    with pytest.raises(ValueError, match="unknown model card kind"):
        make_model_card("nope")


def test_save_pretrained_writes_card_and_safetensors_only(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path / "ckpt")
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert "README.md" in files and "model.safetensors" in files and not any(f.endswith(".bin") for f in files)
    assert ModelCard.load(tmp_path / "ckpt" / "README.md").data.library_name == "hf-collapse"
    with pytest.raises(ValueError, match="safetensors"):
        model.save_pretrained(tmp_path / "x", safe_serialization=False)


def test_truncated_weights_raise_error_naming_file(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CorruptCheckpointError, match=r"model\.safetensors.*corrupt"):
        DualHeadForImageClassification.from_pretrained(tmp_path)
    weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(CorruptCheckpointError, match="corrupt"):
        DualHeadForImageClassification.from_pretrained(tmp_path)


def test_interrupted_save_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    model = tiny_model()
    target = tmp_path / "ckpt"
    model.save_pretrained(target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    import transformers.modeling_utils as mu

    def boom(tensors, filename, metadata=None):
        with open(filename, "wb") as f:  # a half-written weight file, then the process is interrupted
            f.write(b"\x00" * 100)
        raise KeyboardInterrupt("killed while writing weights")

    monkeypatch.setattr(mu, "safe_save_file", boom)
    with torch.no_grad():
        model.classifier.weight.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(target)
    after = {p.name: p.read_bytes() for p in target.iterdir()}
    assert after == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temp folder left behind


def _robust_mamba2():
    from hf_collapse import RobustMamba2Config, RobustMamba2ForCausalLM

    cfg = RobustMamba2Config(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_heads=4, head_dim=16, state_size=8,
                             n_groups=1, expand=2, chunk_size=8, sliding_window=8)  # fmt: skip
    return RobustMamba2ForCausalLM(cfg).eval()


EXPORT_CASES = {
    # name: (model factory, example input, Auto class of the task, output field)
    "dual_head": (tiny_model, lambda: {"pixel_values": torch.randn(2, 1, 28, 28)}, "AutoModelForImageClassification"),
    "robust_mamba2": (_robust_mamba2, lambda: {"input_ids": torch.randint(0, 64, (1, 20))}, "AutoModelForCausalLM"),
}


@pytest.mark.parametrize("case", sorted(EXPORT_CASES))
def test_export_for_hub_loads_without_hf_collapse(tmp_path, case):
    factory, make_inputs, auto_name = EXPORT_CASES[case]
    model = factory()
    out = export_for_hub(model, tmp_path / "export")
    auto_map = json.loads((out / "config.json").read_text())["auto_map"]
    assert {"AutoConfig", "AutoModel", auto_name} <= set(auto_map)
    for py in out.glob("*.py"):
        src = py.read_text()
        assert "from .." not in src
        assert "import hf_collapse" not in src and "from hf_collapse.hub" not in src.replace(
            "from hf_collapse.model_cards import make_model_card", ""
        )
    inputs = make_inputs()
    torch.save({"inputs": inputs, "logits": model(**inputs).logits.detach()}, tmp_path / "io.pt")
    script = textwrap.dedent(f"""
        import sys
        sys.modules["hf_collapse"] = None  # make `import hf_collapse` impossible
        import torch
        import transformers
        io = torch.load({str(tmp_path / "io.pt")!r})
        auto = getattr(transformers, {auto_name!r})
        m = auto.from_pretrained({str(out)!r}, trust_remote_code=True).eval()
        assert "transformers_modules" in type(m).__module__, type(m).__module__
        torch.testing.assert_close(m(**io["inputs"]).logits, io["logits"])
        base = transformers.AutoModel.from_pretrained({str(out)!r}, trust_remote_code=True)
        assert "transformers_modules" in type(base).__module__
        print("REMOTE_OK")
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path,
                         env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HF_HOME": str(tmp_path / "hf")})  # fmt: skip
    assert "REMOTE_OK" in res.stdout, res.stderr[-3000:]


def test_push_uploads_folder_through_http_layer(tmp_path, monkeypatch):
    httpx = pytest.importorskip("httpx2")
    from huggingface_hub.utils import _http

    calls = []

    def handler(request):
        calls.append((request.method, request.url.path, request.content))
        path = request.url.path
        if path.endswith("/repos/create"):
            return httpx.Response(200, json={"url": "https://huggingface.co/me/m", "name": "me/m", "id": "1"})
        if path.endswith("/validate-yaml"):
            return httpx.Response(200, json={"errors": [], "warnings": []})
        if "/preupload/" in path:
            files = json.loads(request.content)["files"]
            return httpx.Response(200, json={"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]})  # fmt: skip
        if "/commit/" in path:
            return httpx.Response(200, json={"commitUrl": "https://huggingface.co/me/m/commit/" + "b" * 40,
                                             "commitOid": "b" * 40, "pullRequestUrl": None})  # fmt: skip
        return httpx.Response(200, json={})

    _http.set_client_factory(lambda: httpx.Client(transport=httpx.MockTransport(handler)))
    _http.close_session()
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    try:
        tiny_model().save_pretrained(tmp_path / "ckpt")
        url = push(tmp_path / "ckpt", "me/m", token="hf_fake")
    finally:
        _http.set_client_factory(_http.default_client_factory)
        _http.close_session()
    assert "commit" in url
    commit = [c for c in calls if "/commit/" in c[1]]
    assert len(commit) == 1 and b"model.safetensors" in commit[0][2] and b"README.md" in commit[0][2]
    (tmp_path / "ckpt" / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="safetensors only"):
        push(tmp_path / "ckpt", "me/m", token="hf_fake")


@pytest.mark.parametrize("case", ["dual_head", "robust_mamba2"])
def test_exported_card_shows_trust_remote_code(tmp_path, case):
    out = export_for_hub(EXPORT_CASES[case][0](), tmp_path / "export")
    text = (out / "README.md").read_text()
    assert "trust_remote_code=True" in text and "pip install hf-collapse" not in text
    plain = tmp_path / "plain"
    EXPORT_CASES[case][0]().save_pretrained(plain)
    assert "pip install hf-collapse" in (plain / "README.md").read_text()


def test_scan_for_upload_checks_the_whole_tree(tmp_path):
    from hf_collapse.hub import scan_for_upload

    ckpt = tmp_path / "ckpt"
    tiny_model().save_pretrained(ckpt)
    (ckpt / "training_args.bin").write_bytes(b"pickle")
    (ckpt / "checkpoint-10").mkdir()
    (ckpt / "checkpoint-10" / "optimizer.pt").write_bytes(b"pickle")
    (ckpt / ".ckpt.tmp-abc").mkdir()
    upload, skipped = scan_for_upload(ckpt)
    assert set(upload) == {"config.json", "model.safetensors", "README.md"}
    assert {"training_args.bin", "checkpoint-10/optimizer.pt"} <= set(skipped)
    (ckpt / "sub").mkdir()
    (ckpt / "sub" / "weights.pt").write_bytes(b"pickle")
    with pytest.raises(ValueError, match=r"sub/weights\.pt is a pickle-format file"):
        scan_for_upload(ckpt)
    (ckpt / "sub" / "weights.pt").unlink()
    (ckpt / "sub" / "w.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(CorruptCheckpointError, match="w.safetensors"):
        scan_for_upload(ckpt)


def test_loading_a_folder_of_another_model_type_fails_before_building(tmp_path):
    from hf_collapse import RobustMamba2ForCausalLM
    from hf_collapse.modeling.checkpoint_utils import WrongCheckpointError

    tiny_model().save_pretrained(tmp_path / "dual")
    with pytest.raises(WrongCheckpointError, match="holds a 'dual_head_classifier' checkpoint"):
        RobustMamba2ForCausalLM.from_pretrained(tmp_path / "dual")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "model.safetensors").write_bytes(b"")
    with pytest.raises(WrongCheckpointError, match="no config.json"):
        RobustMamba2ForCausalLM.from_pretrained(tmp_path / "empty")
    with pytest.raises(WrongCheckpointError, match="no config.json"):
        DualHeadForImageClassification.from_pretrained(tmp_path / "empty")


# a child process that keeps re-saving one checkpoint folder; the parent kills it at several points of a save
_SAVER = """
import sys, torch
from transformers import ResNetConfig
from hf_collapse import DualHeadForImageClassification
cfg = ResNetConfig(num_channels=1, embedding_size=64, hidden_sizes=[128, 256], depths=[2, 2], layer_type="basic")
model = DualHeadForImageClassification.from_backbone(cfg, num_labels=3)
print("ready", flush=True)
version = 0
while True:
    version += 1
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float(version))
    model.config.save_version = version
    model.save_pretrained(sys.argv[1])
"""


def _check_consistent(path) -> int:
    from safetensors.torch import load_file

    version = json.loads((path / "config.json").read_text())["save_version"]
    weights = load_file(path / "model.safetensors")
    values = {float(t.flatten()[0]) for name, t in weights.items() if t.is_floating_point() and "running" not in name}
    assert values == {float(version)}, (version, values)
    return version


def test_kill_during_save_leaves_old_or_new_never_a_mix(tmp_path):
    import time

    target = tmp_path / "ckpt"
    seen = set()
    for delay in (0.05, 0.15, 0.3, 0.5, 0.8, 1.2):
        proc = subprocess.Popen([sys.executable, "-c", _SAVER, str(target)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(delay)
        proc.kill()
        proc.wait()
        if (target / "config.json").exists():
            seen.add(_check_consistent(target))
    assert seen, "no save finished in any run: the kill points never reached a finished checkpoint"
    tiny_model().save_pretrained(target)  # the next save removes what the killed ones left behind
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


OLD_EXPORTS = Path(__file__).resolve().parent / "fixtures" / "exports_v0"


def test_exports_saved_before_the_restructure_load_with_the_package():
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoModelForImageClassification

    expected = load_file(OLD_EXPORTS / "expected.safetensors")
    dual = AutoModelForImageClassification.from_pretrained(OLD_EXPORTS / "dual_head", use_safetensors=True).eval()
    mamba = AutoModelForCausalLM.from_pretrained(OLD_EXPORTS / "robust_mamba2", use_safetensors=True).eval()
    assert type(dual).__module__.startswith("hf_collapse") and type(mamba).__module__.startswith("hf_collapse")
    with torch.no_grad():
        torch.testing.assert_close(dual(pixel_values=expected["pixel_values"]).logits, expected["dual_head_logits"])
        torch.testing.assert_close(mamba(expected["input_ids"]).logits, expected["robust_mamba2_logits"])


def test_exports_saved_before_the_restructure_load_without_the_package(tmp_path):
    code = textwrap.dedent(f"""
        import sys
        sys.modules["hf_collapse"] = None  # hf-collapse cannot be imported here
        import torch
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM, AutoModelForImageClassification
        root = {str(OLD_EXPORTS)!r}
        expected = load_file(root + "/expected.safetensors")
        dual = AutoModelForImageClassification.from_pretrained(root + "/dual_head", trust_remote_code=True).eval()
        mamba = AutoModelForCausalLM.from_pretrained(root + "/robust_mamba2", trust_remote_code=True).eval()
        with torch.no_grad():
            torch.testing.assert_close(dual(pixel_values=expected["pixel_values"]).logits, expected["dual_head_logits"])
            torch.testing.assert_close(mamba(expected["input_ids"]).logits, expected["robust_mamba2_logits"])
        print("ok")
    """)
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]
