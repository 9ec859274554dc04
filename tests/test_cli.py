"""The one command line: every stage registers its subcommands and each answers --help."""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from cthub.cli import build_parser, main
from cthub.provenance import command_line

EXPECTED = ["data", "hub", "pretrain", "finetune", "study", "cam", "robustness", "export", "serve", "demo"]
EXPECTED += ["pacs", "quickstart"]


def _subcommands() -> list[str]:
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return sorted(action.choices)


def test_all_stage_commands_registered() -> None:
    assert set(EXPECTED) <= set(_subcommands())


@pytest.mark.parametrize("cmd", EXPECTED)
def test_each_subcommand_has_help(cmd: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    assert "usage: cthub " + cmd in capsys.readouterr().out


def test_python_dash_m_and_user_error_exit_code() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "cthub", "--version"], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0 and "ct-ssl-hub" in out.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "cthub", "hub", "show", "no-such-model-xyz"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode == 2
    assert "no-such-model-xyz" in bad.stderr and "Traceback" not in bad.stderr


def test_recorded_commands_start_at_the_subcommand_and_write_home_as_tilde() -> None:
    home = str(Path.home())
    argv = ["-v", "study", "--out", f"{home}/runs/a b", "--data", "../shared/x.npz"]
    assert command_line("study", argv=argv) == "cthub study --out ~'/runs/a b' --data ../shared/x.npz"
    parsed = argparse.Namespace(model=f"{home}/m", int8=True, json=False, func=print)
    rebuilt = command_line("export", parsed, argv=[])
    assert rebuilt == "cthub export --int8 --model ~/m"


HEAVY = ("torch", "sklearn", "scipy", "numpy", "matplotlib")  # training, metrics, figures
HEAVY += ("onnxruntime", "onnx", "bentoml", "gradio", "highdicom", "pydicom")  # export, serving, DICOM


def test_building_the_parser_loads_no_heavy_library() -> None:
    """`cthub --help` (and every `cthub CMD --help`) stays quick: stage packages load their API on first use
    and command modules import torch, scikit-learn, ONNX Runtime... only in their handlers."""
    code = (
        "import sys; from cthub.cli import build_parser; build_parser(); "
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", f"building the parser imported {out.stdout.strip()}"


def test_lazy_package_names_resolve_to_the_objects_their_modules_define() -> None:
    """Each stage's public names are declared once (under TYPE_CHECKING in its __init__.py); every one of
    them resolves, on first use, to the object its module defines, and nothing else is an attribute."""
    for package, module, name in [  # ("pretrain", "publish"): a function, its module is pretrain.publishing
        ("hub", "hub.io", "from_pretrained"),
        ("finetune", "finetune.train", "fit"),
        ("pretrain", "pretrain.publishing", "publish"),
        ("export", "export.integrity", "ONNX_NAME"),
        ("ctdata", "ctdata.preprocess", "WINDOW_PRESETS"),
        ("quickstart", "quickstart.budgets", "BUDGETS"),
    ]:
        pkg = importlib.import_module(package)
        assert name in pkg.__all__
        assert getattr(pkg, name) is getattr(importlib.import_module(module), name)
        for public in pkg.__all__:
            assert getattr(pkg, public) is not None, f"{package}.{public}"
        with pytest.raises(AttributeError, match="no attribute 'not_public'"):
            _ = pkg.not_public
