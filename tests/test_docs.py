"""Docs that cannot drift: every flag a command of the README or docs/ uses is listed by that
command's ``-h``; every config path, script and ``python -m`` module they name exists."""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]

# command (script or module) -> (module whose main(argv) prints the help, arguments before -h)
ENTRY_POINTS = {
    "train_pascal_zs3setting.py": "trainer.cli", "train_context_zs3setting.py": "trainer.cli",
    "trainer.cli": "trainer.cli", "trainer.multiseed": "trainer.multiseed", "trainer.aggregate": "trainer.aggregate",
    "trainer.figures": "trainer.figures", "data_loader.verify": "data_loader.verify", "predict.py": "predict",
    "build_embeddings.py": "build_embeddings", "convert_official_checkpoint.py": "convert_official_checkpoint",
    "benchmarks.run": "benchmarks.run",
}
SUBCOMMANDS = {"trainer.aggregate": ("compare",)}
_COMMAND = re.compile(r"(?:^|[\s`(])(?:\S*/)?python3?\s+(-m\s+[\w.]+|[\w./-]+\.py)([^`\n]*(?:\\\n[^`\n]*)*)")


def _doc_text(path: Path) -> str:
    return path.read_text().replace("\\\n", " ")


def commands() -> list[tuple[str, str, list[str]]]:
    """(doc, command, argument tokens) of every ``python SCRIPT`` / ``python -m MODULE`` in the docs."""
    found = []
    for doc in DOCS:
        for line in _doc_text(doc).splitlines():
            for match in _COMMAND.finditer(line):
                target = match.group(1)
                name = target.split()[-1] if target.startswith("-m") else Path(target).name
                try:
                    tokens = shlex.split(match.group(2).split("#")[0], posix=True)
                except ValueError:   # an unbalanced quote inside prose: split on spaces
                    tokens = match.group(2).split()
                found.append((doc.relative_to(ROOT).as_posix(), name, tokens))
    return found


def _help(name: str, tokens: list[str]) -> str:
    module = importlib.import_module(ENTRY_POINTS[name])
    sub = [t for t in tokens[:1] if t in SUBCOMMANDS.get(name, ())]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.raises(SystemExit):
        module.main([*sub, "-h"])
    return out.getvalue() + err.getvalue()


def _flags(tokens: list[str]) -> list[str]:
    flags = []
    for token in tokens:
        if token in ("|", ">", "2>&1", "&&", ";"):
            break   # the rest is another command
        if re.fullmatch(r"--?[A-Za-z][\w-]*(=.*)?", token):
            flags.append(token.split("=", 1)[0])
    return flags


CASES = [(doc, name, tokens) for doc, name, tokens in commands() if name in ENTRY_POINTS]


def test_the_docs_name_commands():
    assert len(CASES) > 30 and {name for _, name, _ in CASES} >= {
        "train_pascal_zs3setting.py", "trainer.multiseed", "trainer.aggregate", "predict.py", "build_embeddings.py"}


@pytest.mark.parametrize("name", sorted({name for _, name, _ in CASES}))
def test_every_flag_the_docs_use_is_listed_by_the_commands_help(name):
    helps: dict[str, str] = {}
    missing = []
    for doc, command, tokens in CASES:
        if command != name:
            continue
        key = " ".join(t for t in tokens[:1] if t in SUBCOMMANDS.get(name, ()))
        text = helps.setdefault(key, _help(name, tokens))
        missing += [f"{doc}: {name} {flag}" for flag in _flags(tokens)
                    if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text)]
    assert not missing, "flags the docs use but -h does not list:\n" + "\n".join(sorted(set(missing)))


def _expand(path: str) -> list[str]:
    """``a/{x,y}.json`` -> ``a/x.json``, ``a/y.json`` (one brace group)."""
    match = re.search(r"\{([^{}]*)\}", path)
    if not match:
        return [path]
    return [path[:match.start()] + part + path[match.end():] for part in match.group(1).split(",")]


def test_every_config_script_and_module_the_docs_name_exists():
    problems = []
    for doc in DOCS:
        text = _doc_text(doc)
        for path in set(re.findall(r"(?<!file )configs/[\w./{},-]+\.json", text)):
            if "..." in path:
                continue
            problems += [f"{doc.name}: {p}" for p in _expand(path) if not (ROOT / p).is_file()]
        for module in set(re.findall(r"python3?\s+-m\s+([\w.]+)", text)):
            if module not in ("pytest", "venv", "pip") and importlib.util.find_spec(module) is None:
                problems.append(f"{doc.name}: python -m {module}")
        for script in set(re.findall(r"python3?\s+(?:\S*/)?([\w-]+\.py)\b", text)):
            if not (ROOT / script).is_file():
                problems.append(f"{doc.name}: {script}")
    assert not problems, "named in the docs but missing:\n" + "\n".join(sorted(problems))
