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


def test_moved_name_still_resolves_with_a_warning():
    import pytest

    from hf_collapse.evals.sentiment_judge import HashedBowJudge

    with pytest.warns(FutureWarning, match="hf_collapse.evals.sentiment_judge"):
        assert hf_collapse.HashedBowJudge is HashedBowJudge
    assert "HashedBowJudge" not in hf_collapse.__all__


def test_import_registers_without_loading_trainers_processors_or_scripts():
    """The front door does what its docstring says: only registration (the modeling packages) runs at import."""
    code = (
        "import sys, hf_collapse\n"
        "heavy = [m for m in sys.modules if m.startswith(('hf_collapse.trainers', 'hf_collapse.processors',"
        " 'hf_collapse.scripts', 'hf_collapse.evals', 'hf_collapse.metrics'))]\n"
        "assert not heavy, heavy\n"
        "assert 'transformers.trainer' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
