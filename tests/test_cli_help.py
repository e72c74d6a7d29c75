"""The command line speaks to users: `seqpack` alone and `seqpack --help` answer at once (no torch import), every
command's --help ends with an example, and no help text or docstring names internal tickets."""

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

from seqpack.bench import BENCHES
from seqpack_cli import COMMANDS, build_parser, main

SRC = Path(__file__).resolve().parents[1] / "src"


def test_help_and_no_arguments_answer_without_importing_torch():
    code = ("import sys; from seqpack_cli import main; a = main(['--help']); b = main([]); "
            "heavy = sorted(m for m in ('torch', 'transformers', 'seqpack') if m in sys.modules); "
            "print(a, b, heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "0 2 []"  # --help: 0, nothing: usage and 2; nothing heavy
    assert "usage: seqpack COMMAND" in out.stdout and "usage: seqpack COMMAND" in out.stderr
    assert all(name in out.stdout for name in COMMANDS)


def test_no_arguments_prints_usage_and_starts_nothing(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main([]) == 2
    err = capsys.readouterr().err
    assert "commands:" in err and "seqpack train --run_dir runs/demo" in err
    assert main(["trian"]) == 2 and "unknown command 'trian'" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # no run folder: nothing was trained


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_help_has_an_example(name):
    text = build_parser(name).format_help()
    assert "\nexamples:\n  seqpack " in text, text[-400:]
    assert not re.search(r"issue|#\d", text, re.I), text


@pytest.mark.parametrize("name", sorted(BENCHES))
def test_every_benchmark_help_has_an_example(name):
    text = importlib.import_module(BENCHES[name]).build_parser().format_help()
    assert f"usage: seqpack bench {name}" in text and f"\nexamples:\n  seqpack bench {name}" in text, text[-400:]
    assert not re.search(r"issue|#\d", text, re.I), text


def test_no_ticket_numbers_in_user_facing_text():
    """Help texts, messages and docstrings are read by users: no 'issue #11' or '(#7)'."""
    pattern = re.compile(r"\bissue\s*#?\d+|\(#\d+\)|\bseeds?/|DESIGN\.md", re.I)
    hits = [f"{p.relative_to(SRC)}:{i}: {line.strip()}" for p in sorted(SRC.rglob("*.py"))
            for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if pattern.search(line)]
    assert hits == []
