"""Package foundation: import, registration, CLI."""

from __future__ import annotations

import subprocess
import sys

import hf_collapse
from hf_collapse.cli import COMMANDS, main


def test_version_and_register_idempotent():
    assert isinstance(hf_collapse.__version__, str) and hf_collapse.__version__
    first = hf_collapse.register()
    second = hf_collapse.register()
    assert first == second
    assert "dual_head_classifier" in first


def test_public_names_resolve():
    for name in ["DualHeadConfig", "DualHeadForImageClassification", "DualHeadDistillationTrainer"]:
        assert getattr(hf_collapse, name).__name__ == name


def test_unknown_attribute_raises():
    import pytest

    with pytest.raises(AttributeError):
        hf_collapse.NoSuchThing  # noqa: B018


def test_cli_help_lists_subcommands(capsys):
    try:
        main(["--help"])
    except SystemExit as e:
        assert e.code == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


def test_registration_in_fresh_process():
    code = (
        "import hf_collapse, transformers\n"
        "hf_collapse.register(); hf_collapse.register()\n"
        "from transformers.models.auto.configuration_auto import CONFIG_MAPPING\n"
        "assert 'dual_head_classifier' in CONFIG_MAPPING\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
