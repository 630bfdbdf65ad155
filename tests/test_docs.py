"""The documentation cannot rot: every example on the site and in the README is run or checked here
(and every robustlab command recorded in benchmarks/RESULTS.md is checked against the command line).

- Every ```python block runs, in page order with one namespace per page (a later block may use what an
  earlier one made), in a fresh working directory.
- Every ```bash line that calls robustlab is checked against the command it calls: the subcommand
  exists and takes every flag shown; a ``robustlab train`` line is parsed and its config validated in
  full (flags, ``--set`` overrides, the YAML file), short of training.
- Every ```yaml block parses; every ``pip install -e '.[EXTRA]'`` names an extra of pyproject.toml.
- Each command's ``--help`` ends with an example, checked the same way.
"""

from __future__ import annotations

import re
import shlex
from functools import cache
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from robustlab.cli import app
from robustlab.commands import load_commands

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "RESULTS.md"]
OPTIONAL_DEPENDENCIES = re.compile(r"^\[project\.optional-dependencies\]\n(.*?)(?=^\[)", re.S | re.M)
FENCE = re.compile(r"^```(\w+)[^\n]*\n(.*?)^```", re.S | re.M)


def blocks(page: Path, language: str) -> list[tuple[int, str]]:
    """(line number, code) of each fenced block of ``language`` in ``page``."""
    text = page.read_text()
    return [(text[: m.start()].count("\n") + 2, m.group(2)) for m in FENCE.finditer(text) if m.group(1) == language]


def command_lines(code: str) -> list[str]:
    """Shell commands of a bash block: continuations joined, comments dropped, ``&&`` chains split."""
    joined = re.sub(r"\\\n\s*", " ", code)
    lines = [re.sub(r"(^|\s)#.*$", "", line).strip() for line in joined.splitlines()]
    return [part.strip() for line in lines if line for part in line.split("&&") if part.strip()]


def robustlab_argv(command: str) -> list[str] | None:
    """The arguments after ``robustlab`` (also under ``python -m`` / ``torchrun -m``); None otherwise."""
    tokens = shlex.split(command)
    while tokens and re.fullmatch(r"[A-Z_]+=\S*", tokens[0]):  # OMP_NUM_THREADS=1 robustlab ...
        tokens = tokens[1:]
    if tokens[:1] == ["robustlab"]:
        return tokens[1:]
    if "-m" in tokens and tokens[tokens.index("-m") + 1 : tokens.index("-m") + 2] == ["robustlab"]:
        return tokens[tokens.index("-m") + 2 :]
    return None


@cache
def help_text(command: str) -> str:
    load_commands()
    result = CliRunner().invoke(app, [command, "--help"], terminal_width=200)
    assert result.exit_code == 0, f"robustlab {command} --help failed: {result.output}"
    return result.output


def check_robustlab_line(argv: list[str], where: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if argv == ["--help"]:
        return
    assert argv and not argv[0].startswith("-"), f"{where}: no subcommand in robustlab {argv}"
    text = help_text(argv[0])
    for token in argv[1:]:
        flag = token.split("=")[0]
        if flag.startswith("-") and flag != "-":
            assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text), (
                f"{where}: 'robustlab {argv[0]}' has no option {flag}"
            )
    if argv[0] == "train":  # parse and validate the whole config, stop before training
        import robustlab.training

        class Validated(Exception):
            pass

        def stop(config, run_dir, **_):
            raise Validated()

        monkeypatch.setattr(robustlab.training, "train", stop)
        monkeypatch.chdir(ROOT)
        result = CliRunner().invoke(app, argv)
        assert isinstance(result.exception, Validated), f"{where}: {result.exception!r} {result.output}"


PYTHON_PAGES = [p for p in PAGES if blocks(p, "python")]


@pytest.mark.parametrize("page", PYTHON_PAGES, ids=[p.name for p in PYTHON_PAGES])
def test_python_examples_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__main__"}
    for line, code in blocks(page, "python"):
        exec(compile(code, f"{page.relative_to(ROOT)}:{line}", "exec"), namespace)  # noqa: S102


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_command_lines_match_the_cli(page, monkeypatch):
    section = OPTIONAL_DEPENDENCIES.search((ROOT / "pyproject.toml").read_text())[1]
    extras = set(re.findall(r"^([\w-]+) = \[", section, re.M))
    checked = 0
    for line, code in blocks(page, "bash"):
        for command in command_lines(code):
            where = f"{page.name}:{line}: {command}"
            for extra in re.findall(r"pip install -e '?\.\[([\w,-]+)\]", command):
                assert set(extra.split(",")) <= extras, where
            argv = robustlab_argv(command)
            if argv is not None:
                check_robustlab_line(argv, where, monkeypatch)
                checked += 1
    for line, code in blocks(page, "yaml"):
        assert isinstance(yaml.safe_load(code), dict), f"{page.name}:{line}"
    if page.name == "README.md":
        assert checked >= 2


def test_every_command_help_is_a_short_manual_with_an_example(monkeypatch):
    load_commands()
    main = CliRunner().invoke(app, ["--help"], terminal_width=100).output
    commands = sorted(app.registered_commands, key=lambda c: c.name or c.callback.__name__)
    for command in commands:
        name = command.name or command.callback.__name__
        (summary,) = [line for line in main.splitlines() if line.startswith(f"  {name} ")]
        assert not summary.endswith("..."), f"robustlab --help cuts off the summary of {name}"
        text = help_text(name)
        assert "Example:" in text, f"robustlab {name} --help has no example"
        example = text.split("Example:", 1)[1].strip().splitlines()[0]
        argv = robustlab_argv(example)
        assert argv is not None and argv[0] == name, example
        check_robustlab_line(argv, f"robustlab {name} --help", monkeypatch)
