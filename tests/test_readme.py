"""The README's promises: its first two lines are the install+main-job and test commands that CI uses, and its
Python snippets run as written."""
from __future__ import annotations

import re
import shlex

import pytest

from conftest import REPO

README = (REPO / "README.md").read_text()


def _commands() -> tuple[str, str]:
    first, second = README.splitlines()[:2]
    return first.strip().strip("`").strip(), second.strip().strip("`").strip()


def test_first_line_installs_and_runs_the_main_job():
    main_cmd, _ = _commands()
    assert main_cmd.startswith("bash scripts/install.sh && ")
    assert main_cmd.endswith("-m cnnapps.tasks.ecg train")
    python = shlex.split(main_cmd.split("&&")[1])[0]
    assert python == ".venv/bin/python"
    assert "ln -sfn \"$venv\" .venv" in (REPO / "scripts" / "install.sh").read_text()


def test_second_line_is_what_ci_runs():
    _, test_cmd = _commands()
    assert test_cmd == "bash scripts/test.sh"
    ci = (REPO / ".ci" / "run").read_text()
    assert test_cmd in ci
    assert "scripts/install.sh" in (REPO / "scripts" / "test.sh").read_text()


SNIPPETS = re.findall(r"```python\n(.*?)```", README, flags=re.S)


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_python_snippets_run(index, capsys, tmp_path, monkeypatch, data_root):
    monkeypatch.chdir(tmp_path)  # a snippet's run folders land here, not in the checkout
    exec(compile(SNIPPETS[index], f"README.md snippet {index}", "exec"), {"__name__": "__readme__"})
    out = capsys.readouterr().out
    if "cnnapps.train(" in SNIPPETS[index]:  # the user's callback was called, every epoch
        assert "epoch 1: validation accuracy" in out and "epoch 2: validation accuracy" in out
        assert (tmp_path / "runs/readme-mnist/checkpoints/best.pt").is_file()
    # Each snippet states its printed shapes in comments; check they are what it prints.
    for expected in re.findall(r"# (torch\.Size\(\[[^\]]*\]\))", SNIPPETS[index]):
        assert expected in out
