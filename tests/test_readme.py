"""README.md's commands work as written on a fresh clone: every command of every fenced bash block runs a program
that exists here, through one convention (`uv run ...` for the project's tools), and every `make` target it names
is in the Makefile. Nothing is run; the commands are parsed."""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.prefix) / "bin"  # the environment `uv run` runs in (this test runs in it too)
# Programs a README command may start with: shell builtins and the tools a machine brings itself.
SYSTEM = {"cd", "export", "source", "mkdir", "echo", "test", "uv", "make", "git", "curl", "docker", "pip", "realpath"}
OPERATORS = {"&&", "||", ";", "|", "&"}
UV_FLAGS_WITH_VALUE = {"--python", "--extra", "--with", "--group", "--env-file", "--directory", "--project"}


def bash_blocks(text: str) -> list[tuple[int, str]]:
    """(line number, body) of each ```bash fence, indented ones (in list items) included."""
    blocks, body, start, indent = [], None, 0, ""
    for number, line in enumerate(text.splitlines(), 1):
        fence = re.match(r"^(\s*)```(\w*)\s*$", line)
        if body is None and fence and fence.group(2) in ("bash", "sh", "shell"):
            body, start, indent = [], number, fence.group(1)
        elif body is not None and fence:
            blocks.append((start, "\n".join(body)))
            body = None
        elif body is not None:
            body.append(line[len(indent):] if line.startswith(indent) else line)
    assert body is None, f"README.md: the fence opened at line {start} is never closed"
    return blocks


def commands(block: str) -> list[list[str]]:
    """Each simple command of a block as its words: continuation lines joined, comments dropped, split at
    `&&`, `||`, `;` and pipes; leading VAR=value assignments dropped."""
    out = []
    for line in block.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        words: list[str] = []
        for token in [*lexer, ";"]:
            if token in OPERATORS or set(token) <= set("&|;"):
                while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
                    words.pop(0)
                if words:
                    out.append(words)
                words = []
            else:
                words.append(token)
    return out


def makefile_targets() -> set[str]:
    text = (REPO / "Makefile").read_text()
    return set(re.findall(r"^([A-Za-z0-9_.-]+)\s*:(?!=)", text, flags=re.M))


def problem(words: list[str]) -> str | None:
    """Why this command would fail with 'command not found' (or an unknown make target), or None."""
    program = words[0]
    if program == "uv":
        if len(words) < 2 or words[1] != "run":
            return None  # uv sync, uv pip ...: uv's own sub-commands
        rest = words[2:]
        while rest and rest[0].startswith("-"):
            flag = rest.pop(0)
            if flag in UV_FLAGS_WITH_VALUE and rest:
                rest.pop(0)
        if not rest:
            return "`uv run` with no program"
        tool = rest[0]
        if tool in ("python", "python3") and rest[1:2] == ["-m"] and len(rest) > 2:
            return None if importlib.util.find_spec(rest[2]) else f"no python module {rest[2]}"
        return None if (VENV_BIN / tool).exists() else f"`uv run {tool}`: {tool} is not in the environment"
    if program == "make":
        targets = [w for w in words[1:] if not w.startswith("-") and "=" not in w]
        unknown = [t for t in targets if t not in makefile_targets()]
        return f"make target(s) {unknown} not in the Makefile" if unknown else None
    if program in SYSTEM:
        return None
    if (VENV_BIN / program).exists():  # on PATH here (pytest runs under `uv run`), not in the reader's shell
        return f"{program} is in the project's environment only: write `uv run {program} ...`"
    outside = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if Path(p) != VENV_BIN)
    return None if shutil.which(program, path=outside) else f"{program}: command not found"


README = (REPO / "README.md").read_text()
CASES = [(start, words) for start, block in bash_blocks(README) for words in commands(block)]


def test_the_readme_has_commands_to_check():
    assert len(bash_blocks(README)) >= 8 and len(CASES) >= 25
    assert any(w[:3] == ["uv", "run", "dvc"] for _, w in CASES)


@pytest.mark.parametrize("start,words", CASES, ids=[f"line{s}-{' '.join(w)[:40]}" for s, w in CASES])
def test_every_readme_command_runs_a_program_that_exists(start, words):
    why = problem(words)
    assert why is None, f"README.md, block at line {start}: `{' '.join(words)}`: {why}"


def test_the_checker_catches_what_a_fresh_clone_meets():
    bare = commands("cd pipelines/demo && dvc exp run -S prune.rate=0.65   # a comment\nmicronet count --arch x")
    assert [w[0] for w in bare] == ["cd", "dvc", "micronet"]
    assert problem(bare[1]) and problem(bare[2])  # not on PATH outside `uv run`, or only in the venv
    assert problem(["uv", "run", "no-such-tool"]) and problem(["make", "no-such-target"])
    assert problem(["uv", "run", "--frozen", "dvc", "repro"]) is None
    assert problem(["make", "demo", "PIPELINE=kaist"]) is None
    assert commands("COLUMNS=200 make exp-show") == [["make", "exp-show"]]
    assert commands("mkdir -p a && curl -L -o a/b \\\n  https://x/y") == [["mkdir", "-p", "a"],
                                                                          ["curl", "-L", "-o", "a/b", "https://x/y"]]
