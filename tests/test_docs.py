"""The docs site and the commands it shows: ``mkdocs build --strict`` passes, and every ``fflayers ...`` and
``python analysis/...`` command in a fenced code block of README.md or docs/*.md exists (its ``--help``
exits 0), so a renamed command, subcommand or script fails here rather than in a reader's shell."""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

#: groups of ``fflayers`` (fflayers/cli/main.py) without subcommands: the next token is a flag or an argument
FFLAYERS_LEAF_GROUPS = {"neurons", "merge"}
#: analysis scripts whose first argument is a subcommand (wrappers of ``fflayers recall|shortcuts|embedding``)
SUBCOMMAND_SCRIPTS = {"dissect_recall.py", "linear_shortcuts.py", "embedding_space.py"}

_FENCE = re.compile(r"^\s*(`{3,}|~{3,})")
_WORD = re.compile(r"^[a-z][a-z0-9_-]*$")
_ALTERNATIVES = re.compile(r"^\{([a-z0-9_|-]+)\}$")


def fenced_lines(text: str) -> list[str]:
    """The lines inside fenced code blocks, stripped of indentation and a leading ``$ ``, with
    backslash-continued lines joined; comment lines dropped."""
    lines: list[str] = []
    fence: str | None = None
    pending = ""
    for raw in text.splitlines():
        match = _FENCE.match(raw)
        if fence is None:
            if match:
                fence = match.group(1)
            continue
        if match and match.group(1)[0] == fence[0] and len(match.group(1)) >= len(fence) \
                and not raw.strip()[len(match.group(1)):].strip():
            fence, pending = None, ""
            continue
        line = raw.strip()
        if pending:
            line = pending + " " + line
            pending = ""
        if line.endswith("\\"):
            pending = line[:-1].rstrip()
            continue
        if line.startswith("$ "):
            line = line[2:].lstrip()
        if line and not line.startswith("#"):
            lines.append(line)
    return lines


def _tokens(line: str) -> list[str]:
    try:
        return shlex.split(line, comments=True)
    except ValueError:  # an unbalanced quote in a sketch of a command: plain words are enough here
        return line.split("#", 1)[0].split()


def _alternatives(token: str) -> list[str]:
    """``{a|b|c}`` (a choice written out in the docs) -> its words; any other token -> itself."""
    match = _ALTERNATIVES.match(token)
    return match.group(1).split("|") if match else [token]


def command_prefixes(line: str) -> list[tuple[str, ...]]:
    """The command a docs line runs: ``("fflayers", GROUP[, COMMAND])`` or ``("analysis/SCRIPT.py"[, SUB])``
    (several where a ``{a|b}`` choice is written out); ``[]`` for any other line."""
    tokens = _tokens(line)
    if not tokens:
        return []
    if tokens[0] == "fflayers":
        rest = tokens[1:]
        if not rest or rest[0].startswith("-"):
            return [("fflayers",)]
        out = []
        for group in _alternatives(rest[0]):
            subs = _alternatives(rest[1]) if group not in FFLAYERS_LEAF_GROUPS and len(rest) > 1 else []
            subs = [s for s in subs if _WORD.match(s)]
            out += [("fflayers", group, s) for s in subs] or [("fflayers", group)]
        return out
    if tokens[0] == "python" and len(tokens) > 1 and tokens[1].startswith("analysis/"):
        script, rest = tokens[1], tokens[2:]
        if Path(script).name in SUBCOMMAND_SCRIPTS and rest:
            subs = [s for s in _alternatives(rest[0]) if _WORD.match(s)]
            if subs:
                return [(script, s) for s in subs]
        return [(script,)]
    return []


def documented_commands() -> list[tuple[str, ...]]:
    """Every distinct command prefix of the fenced code blocks of README.md and docs/*.md, in order."""
    seen: dict[tuple[str, ...], None] = {}
    for path in DOC_FILES:
        for line in fenced_lines(path.read_text(encoding="utf-8")):
            for prefix in command_prefixes(line):
                seen.setdefault(prefix, None)
    return list(seen)


COMMANDS = documented_commands()


def test_documented_commands_found():
    """The parser sees the docs' commands (an empty list would make the --help test vacuous)."""
    assert ("fflayers",) in COMMANDS
    assert ("fflayers", "neurons") in COMMANDS and ("fflayers", "merge") in COMMANDS
    assert ("fflayers", "recall", "sublayer-knockout") in COMMANDS
    assert ("analysis/generate_outputs.py",) in COMMANDS
    assert ("analysis/linear_shortcuts.py", "early-exit") in COMMANDS


def test_parser_rules():
    assert command_prefixes("fflayers memories {mine|plot} ...  # x") == [
        ("fflayers", "memories", "mine"), ("fflayers", "memories", "plot")]
    assert command_prefixes("fflayers neurons --hf_model gpt2") == [("fflayers", "neurons")]
    assert command_prefixes("fflayers neurons ...") == [("fflayers", "neurons")]
    assert command_prefixes("fflayers shortcuts --help") == [("fflayers", "shortcuts")]
    assert command_prefixes("python analysis/embedding_space.py heads ... --n 5") == [
        ("analysis/embedding_space.py", "heads")]
    assert command_prefixes("python analysis/generate_outputs.py ...same flags... --shard 1/16") == [
        ("analysis/generate_outputs.py",)]
    assert command_prefixes("torchrun analysis/generate_outputs.py") == []
    text = "```bash\n# comment\n$ python analysis/x.py --a \\\n    --b\n```\nfflayers outside\n"
    assert fenced_lines(text) == ["python analysis/x.py --a --b"]


def test_groups_match_the_cli():
    from fflayers.cli.main import COMMANDS as CLI_COMMANDS

    names = {c.name for c in CLI_COMMANDS}
    assert names >= FFLAYERS_LEAF_GROUPS
    assert {p[1] for p in COMMANDS if p[0] == "fflayers" and len(p) > 1} <= names


@pytest.mark.parametrize("prefix", COMMANDS, ids=[" ".join(p) for p in COMMANDS])
def test_documented_command_help(prefix: tuple[str, ...]):
    """``COMMAND --help`` of every command the docs show exits 0."""
    if prefix[0] == "fflayers":
        argv = [sys.executable, "-m", "fflayers", *prefix[1:], "--help"]
    else:
        assert (ROOT / prefix[0]).is_file(), f"{prefix[0]} is shown in the docs but does not exist"
        argv = [sys.executable, prefix[0], *prefix[1:], "--help"]
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(prefix)} --help: exit {proc.returncode}\n{proc.stderr[-2000:]}"


def test_mkdocs_build_strict(tmp_path: Path):
    """The site builds with no warning (``--strict``: broken links, anchors, cross-references and API pages
    fail)."""
    missing = [m for m in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python")
               if _find_spec(m) is None]
    if missing:
        pytest.skip(f"the docs tools are not installed ({', '.join(missing)}): they come with the 'docs' "
                    "extra (requirements.lock, make install), not with the HuggingFace-only set")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # material's end-of-life banner, not a build warning
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir",
                           str(tmp_path / "site")], cwd=ROOT, capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, (f"mkdocs build --strict failed:\n{proc.stdout[-3000:]}\n"
                                  f"{proc.stderr[-5000:]}")
    assert (tmp_path / "site" / "api" / "index.html").is_file()


def _find_spec(name: str):
    try:
        return importlib.util.find_spec(name)
    except ModuleNotFoundError:  # a parent package is missing
        return None
