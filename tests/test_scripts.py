"""The command line and its entry-point modules: dispatch, one-line errors, bundled checkpoints, the built wheel."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from hf_collapse.cli import COMMANDS, main
from hf_collapse.scripts.utils import bundled_checkpoint, checkpoints_dir

REPO = Path(__file__).resolve().parent.parent
BUNDLED = ("robust-mamba2-tiny", "dual-head-fashion-mnist", "smollm2-135m-sentiment-prefixes", "sentiment-judge")


def test_every_command_has_a_main():
    import importlib

    for name, (_, module) in COMMANDS.items():
        assert callable(importlib.import_module(f"hf_collapse.scripts.{module}").main), name


@pytest.mark.parametrize(
    "argv, message",
    [
        (["passkey", "--model", "m", "--lengths", "abc"], "--lengths must be a comma-separated list of int"),
        (["passkey", "--model", "m", "--lengths", "-5"], "--lengths must be an integer >= 1"),
        (["passkey", "--model", "m", "--trials", "0"], "--trials must be an integer >= 1"),
        (["passkey", "--model", "m", "--threads", "0"], "--threads must be an integer >= 1"),
        (["passkey", "--model", "m", "--decay_scale", "nan"], "--decay_scale must be a finite number > 0"),
        (["position-loss", "--model", "m", "--synthetic", "newlines", "--bucket_size", "0"], "--bucket_size"),
        (["position-loss", "--model", "m", "--synthetic", "newlines", "--stats_every", "0"], "--stats_every"),
        (["position-loss", "--model", "m"], "exactly one of --text_file and --synthetic"),
        (["generate", "--model", "m", "--prefixes", "p", "--attribute", "a", "--strength", "-1", "x"], "--strength"),
        (["generate", "--model", "m", "--prefixes", "p", "--attribute", "a", "--strength", "nan", "x"], "got nan"),
        (["generate", "--model", "m", "--prefixes", "p", "--attribute", "a", ""], "prompt is empty"),
        (["generate", "--model", "m", "--prefixes", "p", "--attribute", "a", "--num_samples", "0", "x"], "num_samples"),
        (["demo", "--only", "nope"], "--only must be one of"),
        (["passkey", "--model", "m", "--trials", "abc"], "invalid int value: 'abc' (see hf-collapse passkey --help)"),
        (["passkey"], "the following arguments are required: --model"),
        (["demo", "--strength", "inf"], "--strength must be a finite number"),
        (["demo", "--only", "air", "--judge", "/no/such/judge"], "--judge: /no/such/judge is not a judge: it has"),
        (["demo", "--air_task", "nope"], "--air_task must be one of ('sentiment', 'topic', 'detox')"),
        # the bundled judge only knows sentiment: refused for topic before the LM is loaded
        (["demo", "--only", "air", "--air_task", "topic", "--judge", str(checkpoints_dir() / "sentiment-judge")],
         "not ['world', 'sports', 'business', 'science']"),
        (["train-prefixes", "--model", "m", "--data", "/no/such.jsonl", "--output_dir", "o"], "is not a file"),
    ],
)
def test_user_errors_print_one_line_and_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"hf-collapse {argv[0]}: error: ") and message in err, err
    assert "\n" not in err and "Traceback" not in err


def test_debug_env_shows_the_traceback(monkeypatch):
    monkeypatch.setenv("HF_COLLAPSE_DEBUG", "1")
    with pytest.raises(ValueError, match="--trials"):
        main(["passkey", "--model", "m", "--trials", "0"])


def test_every_demo_task_steers_toward_attributes_its_bundled_checkpoint_has():
    from hf_collapse.scripts.demo import AIR_TASKS

    for name, task in AIR_TASKS.items():
        index = json.loads((bundled_checkpoint(task.checkpoint) / "attribute_prefixes.json").read_text())
        assert set(task.targets) <= set(index["attributes"]), name


def test_bundled_checkpoints_are_package_data():
    """Found through importlib.resources (inside the installed package), not through the source tree's layout."""
    root = checkpoints_dir()
    assert root.parts[-2:] == ("hf_collapse", "checkpoints")
    for name in BUNDLED:
        assert (bundled_checkpoint(name) / "README.md").is_file()
    with pytest.raises(FileNotFoundError, match="HF_COLLAPSE_CHECKPOINTS"):
        bundled_checkpoint("no-such-checkpoint")


@pytest.mark.slow
def test_built_wheel_runs_the_demo_from_an_empty_directory(tmp_path):
    """`pip wheel .`, install it into a fresh venv that cannot see the source tree, run the demo from an empty dir.

    The venv reaches the already-installed dependencies (torch, transformers, ...) through a plain path entry to
    this interpreter's site-packages: a path line in a .pth file adds the folder without running the .pth files in
    it, so the editable install of the source tree stays invisible.
    """
    wheel_dir, venv, empty = tmp_path / "wheel", tmp_path / "venv", tmp_path / "empty"
    empty.mkdir()
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(REPO),
                    "-w", str(wheel_dir)], check=True)  # fmt: skip
    (wheel,) = wheel_dir.glob("hf_collapse-*.whl")
    assert wheel.stat().st_size < 100 * 2**20, "the wheel must stay under PyPI's default 100 MB file limit"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    vpy = venv / "bin" / "python"
    vsite = Path(subprocess.check_output([vpy, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                         text=True).strip())  # fmt: skip
    (vsite / "_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(vpy), "install", "--no-deps", "-q", str(wheel)],
                   check=True)  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HF_COLLAPSE_CHECKPOINTS")}
    where = subprocess.check_output([vpy, "-c", "import hf_collapse; print(hf_collapse.__file__)"], cwd=empty,
                                    env=env, text=True).strip()  # fmt: skip
    assert where.startswith(str(venv)), f"hf_collapse came from {where}, not the installed wheel"
    exe = venv / "bin" / "hf-collapse"
    out = subprocess.run([exe, "demo", "--only", "mamba", "--mamba_tokens", "1024", "--threads", "2"], cwd=empty,
                         env=env, capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert "skipped" not in out and "loss, mitigated" in out, out
    out = subprocess.run([exe, "demo", "--only", "dhkd"], cwd=empty, env=env, capture_output=True, text=True,
                         check=True).stdout  # fmt: skip
    assert "skipped" not in out and "accuracy on" in out, out
    assert list(empty.iterdir()) == []


def _tiny_lm_and_data(tmp_path):
    """A saved tiny GPT-2 with its tokenizer, and a toy prefix-training file: (model folder, data file)."""
    from air_decoding_utils import tiny_gpt2, tiny_tokenizer, toy_dataset

    model_dir = tmp_path / "lm"
    tiny_gpt2().save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    data = tmp_path / "train.jsonl"
    toy_dataset().to_json(str(data))
    return model_dir, data


def test_train_prefixes_then_generate(tmp_path, capsys):
    """`train-prefixes` takes `AttributePrefixConfig`'s own fields under their `TrainingArguments` names."""
    model_dir, data = _tiny_lm_and_data(tmp_path)
    out = tmp_path / "prefixes"
    rc = main(["train-prefixes", "--model", str(model_dir), "--data", str(data), "--attributes", "positive",
               "negative", "--output_dir", str(out), "--num_virtual_tokens", "4", "--max_steps", "2",
               "--per_device_train_batch_size", "4", "--learning_rate", "1e-2", "--save_strategy", "no",
               "--use_cpu", "--gate_data", str(data), "--gate_min", "0"])  # fmt: skip
    assert rc == 0 and (out / "attribute_prefixes.json").is_file()
    printed = capsys.readouterr().out
    gate = json.loads((out / "prefix_gate.json").read_text())
    assert f"prefix gate on 24 held-out texts: accuracy {gate['accuracy']:.4f}" in printed
    assert gate["n"] == 24 and set(gate["per_attribute"]) == {"positive", "negative"} and gate["passed"]
    assert not list(out.glob(".*.tmp"))
    rc = main(["generate", "--model", str(model_dir), "--prefixes", str(out), "--attribute", "positive", "--strength",
               "140", "--num_samples", "2", "--max_new_tokens", "4", "the movie"])  # fmt: skip
    assert rc == 0
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("the movie")]
    assert len(lines) == 2
    # without --strength: the checkpoint's default_strength when it records one, else the paper's 140
    rc = main(["generate", "--model", str(model_dir), "--prefixes", str(out), "--attribute", "positive",
               "--num_samples", "1", "--max_new_tokens", "2", "the movie"])  # fmt: skip
    assert rc == 0 and "lambda = 140 (the checkpoint records no default_strength" in capsys.readouterr().err
    index = json.loads((out / "attribute_prefixes.json").read_text())
    (out / "attribute_prefixes.json").write_text(json.dumps({**index, "default_strength": 60.0}))
    rc = main(["generate", "--model", str(model_dir), "--prefixes", str(out), "--attribute", "positive",
               "--num_samples", "1", "--max_new_tokens", "2", "the movie"])  # fmt: skip
    assert rc == 0 and "lambda = 60 (the checkpoint's default_strength)" in capsys.readouterr().err
    assert main(["generate", "--model", str(model_dir), "--prefixes", str(out), "--attribute", "happy", "x"]) == 2
    assert "unknown --attribute 'happy'" in capsys.readouterr().err
    rc = main(["train-prefixes", "--model", str(model_dir), "--data", str(data), "--attributes", "positive",
               "--output_dir", str(tmp_path / "one"), "--use_cpu"])  # fmt: skip
    assert rc == 2 and "at least two attributes are needed" in capsys.readouterr().err


def test_train_prefixes_early_stopping_and_resume_last(tmp_path, capsys):
    model_dir, data = _tiny_lm_and_data(tmp_path)
    out = tmp_path / "prefixes"
    common = ["train-prefixes", "--model", str(model_dir), "--data", str(data), "--attributes", "positive",
              "negative", "--output_dir", str(out), "--num_virtual_tokens", "4", "--per_device_train_batch_size", "4",
              "--learning_rate", "1e-2", "--use_cpu", "--save_strategy", "steps", "--save_steps", "2"]  # fmt: skip
    rc = main([*common, "--max_steps", "4", "--eval_data", str(data), "--eval_strategy", "steps", "--eval_steps", "2",
               "--early_stopping_patience", "2"])  # fmt: skip
    assert rc == 0 and (out / "checkpoint-4" / "prefix_encoders.safetensors").is_file()
    rc = main([*common, "--max_steps", "6", "--resume_from_checkpoint", "last"])
    assert rc == 0 and "resuming from" in capsys.readouterr().out and (out / "checkpoint-6").is_dir()
    assert main([*common, "--early_stopping_patience", "2"]) == 2  # no --eval_data
    assert "needs --eval_data" in capsys.readouterr().err


def test_train_prefixes_early_stopping_min_epochs_and_threshold(tmp_path, capsys):
    """With a learning rate of 0 the held-out loss never improves: patience 1 stops at the second evaluation, unless
    --early_stopping_min_epochs asks for two full passes over the 24 texts (6 steps of 4 each) first."""
    import json

    model_dir, data = _tiny_lm_and_data(tmp_path)

    def steps_run(out, *extra, lr="0"):
        rc = main(["train-prefixes", "--model", str(model_dir), "--data", str(data), "--attributes", "positive",
                   "negative", "--output_dir", str(out), "--num_virtual_tokens", "4", "--num_train_epochs", "5",
                   "--per_device_train_batch_size", "4", "--learning_rate", lr, "--use_cpu", "--eval_data", str(data),
                   "--eval_strategy", "steps", "--eval_steps", "1", "--save_strategy", "steps", "--save_steps", "1",
                   "--early_stopping_patience", "1", *extra])  # fmt: skip
        assert rc == 0
        state = json.loads(max(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
                           .joinpath("trainer_state.json").read_text())  # fmt: skip
        return state["global_step"]

    assert steps_run(tmp_path / "a") == 2
    # rerunning a converged run trains nothing (it only reruns the gate, if asked); a larger patience resumes it
    capsys.readouterr()
    assert steps_run(tmp_path / "a", "--resume_from_checkpoint", "last") == 2
    assert "converged at step 2 (early stopping) and its best prefixes are saved" in capsys.readouterr().out
    # (Trainer does not restore callback state by default, so the new patience counts from the resumed step: 3, 4)
    assert steps_run(tmp_path / "a", "--resume_from_checkpoint", "last", "--early_stopping_patience", "2") == 4
    assert "resuming from" in capsys.readouterr().out
    assert steps_run(tmp_path / "b", "--early_stopping_min_epochs", "2") == 12  # step 12 ends epoch 2
    # a learning rate that lowers the held-out loss at every step: only improvements below the threshold stop it
    assert steps_run(tmp_path / "d", "--num_train_epochs", "1", lr="1e-2") == 6
    assert steps_run(tmp_path / "e", "--num_train_epochs", "1", "--early_stopping_threshold", "100", lr="1e-2") == 2
    assert main(["train-prefixes", "--model", str(model_dir), "--data", str(data), "--attributes", "positive",
                 "--output_dir", str(tmp_path / "c"), "--early_stopping_min_epochs", "nan"]) == 2  # fmt: skip
    assert main(["train-prefixes", "--model", str(model_dir), "--data", str(data), "--attributes", "positive",
                 "--output_dir", str(tmp_path / "c"), "--early_stopping_threshold", "0.1"]) == 2  # fmt: skip
    assert "early_stopping_min_epochs" in capsys.readouterr().err
