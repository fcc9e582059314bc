"""The docs name only commands, flags and make targets that exist: every ``selfflow …`` command in the
README's and docs' code (blocks and inline spans) is parsed against the real argument parser, and every
``make TARGET`` against the Makefile, so a renamed flag or target fails here instead of in a user's shell."""

import argparse
import re
import shlex
from pathlib import Path

import pytest

from selfflow.core.cli import EPILOG, build_parser

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted(ROOT.glob("*/README*.md"))]
# `selfflow`, `.venv/bin/selfflow` or `-m selfflow.core.cli`, then the rest of the command
COMMAND = re.compile(r"(?:^|[\s/])selfflow(?:\.core\.cli)?\s+(.*)")
MAKE = re.compile(r"(?:^|[;&|])\s*make ([a-z0-9][a-z0-9-]*)")  # a shell command, not prose in a comment


def _code(text: str) -> list[str]:
    """Lines of the fenced code blocks (continuations joined) and the inline code spans."""
    out = []
    for block in re.findall(r"^```[^\n]*\n(.*?)^```", text, re.S | re.M):
        out += block.replace("\\\n", " ").splitlines()
    prose = re.sub(r"^```[^\n]*\n.*?^```", "", text, flags=re.S | re.M)
    return out + re.findall(r"`([^`\n]+)`", prose)


def _commands() -> list[tuple[str, str]]:
    found = []
    for doc in DOCS:
        for line in _code(doc.read_text()):
            if m := COMMAND.search(line):
                found.append((doc.name, m.group(1)))
    # the examples in `selfflow --help` and in each command's own --help
    epilogs = [("cli.EPILOG", EPILOG)] + [(f"selfflow {name} --help", p.epilog or "")
                                          for name, p in _subparsers(build_parser()).items()]
    for where, text in epilogs:
        for line in text.replace("\\\n", " ").splitlines():  # shell continuations joined, as in the docs
            if m := COMMAND.search(line):
                found.append((where, m.group(1)))
    return found


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(subs[0].choices) if subs else {}


def _subcommand(parser: argparse.ArgumentParser, words: list[str]) -> tuple[argparse.ArgumentParser, str]:
    """Follow the sub-command words as far as they go: the innermost parser and the path taken."""
    path = []
    for word in words:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs or word not in subs[0].choices:
            break
        parser, path = subs[0].choices[word], [*path, word]
    return parser, " ".join(path)


def test_the_docs_name_commands():
    assert len(_commands()) > 20  # the scan finds the README's commands


@pytest.mark.parametrize(("doc", "command"), _commands())
def test_every_documented_flag_exists(doc, command):
    words = shlex.split(command, comments=True)
    parser, path = _subcommand(build_parser(), words)
    flags = {w.split("=")[0] for w in words if w.startswith("--")}
    unknown = sorted(f for f in flags if f not in parser._option_string_actions)
    assert not unknown, f"{doc}: `selfflow {path}` has no {unknown} (in: selfflow {command})"


def test_every_documented_make_target_exists():
    targets = set(re.findall(r"^([a-z0-9][a-z0-9-]*):", (ROOT / "Makefile").read_text(), re.M))
    named = {(doc.name, t) for doc in DOCS for line in _code(doc.read_text())
             for t in MAKE.findall(re.sub(r"(^|\s)#.*", "", line))}
    assert named and not sorted(n for n in named if n[1] not in targets)


def test_the_readme_metrics_from_python_example_runs(capsys):
    """The example needs no weights: it runs as printed, and prints the numbers its comments show."""
    section = (ROOT / "README.md").read_text().split("### Metrics from Python", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"^```python\n(.*?)^```", section, re.S | re.M)
    exec(compile(code, "README.md (Metrics from Python)", "exec"), {})
    shown = [line.split("# ", 1)[1] for line in code.splitlines() if line.startswith("print(")]
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == len(shown) and all(p.startswith(s) for p, s in zip(printed, shown)), printed
