"""Docs that cannot drift: every command of the README and docs/ (``python SCRIPT``, ``python -m
MODULE``, ``torchrun ... SCRIPT``) uses only option strings of that command's parser; every Python
block runs (on a tiny demo run) and shows what it prints; every config, module, file and link
named exists."""
from __future__ import annotations

import doctest
import importlib
import importlib.util
import re
import shlex
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
SUBCOMMANDS = {"trainer.aggregate": ("compare",)}
PASSTHROUGH = {"trainer.multiseed"}   # other options go to every training run
STOP = {"|", ">", "2>&1", "&&", ";", "&", "#"}
_COMMAND = re.compile(r"(?:^|[\s`(])(?:\S*/)?(python3?|torchrun)\s+([^`\n]*)")


def _parser(name: str):
    """The argparse parser of a documented command."""
    if name in ("train_pascal_zs3setting.py", "train_context_zs3setting.py", "trainer.cli"):
        from trainer.options import build_arg_parser
        return build_arg_parser(None)
    if name == "torchrun":
        from torch.distributed.run import get_args_parser
        return get_args_parser()
    module = name[:-3] if name.endswith(".py") else name
    return importlib.import_module(module).build_parser()


def _options(name: str, sub: str | None) -> set[str]:
    parser = _parser(name)
    if sub is not None:
        parser = next(a for a in parser._actions if hasattr(a, "choices") and isinstance(a.choices, dict)).choices[sub]
    options = set(parser._option_string_actions)
    return options | (_options("trainer.cli", None) if name in PASSTHROUGH else set())


def commands() -> list[tuple[str, str, str | None, list[str]]]:
    """(doc, command, subcommand, argument tokens) of every documented command."""
    found = []
    for doc in DOCS:
        text = doc.read_text().replace("\\\n", " ")
        for match in _COMMAND.finditer(text):
            try:
                tokens = shlex.split(match.group(2), comments=True)
            except ValueError:   # an unbalanced quote inside prose
                tokens = match.group(2).split()
            tokens = tokens[:next((i for i, t in enumerate(tokens) if t in STOP), len(tokens))]
            where = doc.relative_to(ROOT).as_posix()
            if match.group(1) == "torchrun":
                script = next((i for i, t in enumerate(tokens) if t.endswith(".py")), None)
                if script is not None:
                    found.append((where, "torchrun", None, tokens[:script]))
                    found.append((where, Path(tokens[script]).name, None, tokens[script + 1:]))
                continue
            if tokens[:1] == ["-m"] and len(tokens) > 1:
                name, rest = re.match(r"[\w.]*", tokens[1]).group(0), tokens[2:]
            elif tokens and re.match(r"[\w./-]+\.py", tokens[0]):
                name, rest = Path(re.match(r"[\w./-]+\.py", tokens[0]).group(0)).name, tokens[1:]
            else:
                continue
            if name in ("pip", "venv", "pytest") or (ROOT / name).suffix == ".py" and not (ROOT / name).is_file():
                continue
            sub = rest[0] if rest[:1] and rest[0] in SUBCOMMANDS.get(name, ()) else None
            found.append((where, name, sub, rest))
    return found


CASES = commands()


def test_the_docs_name_every_command_line():
    assert {name for _, name, _, _ in CASES} >= {
        "train_pascal_zs3setting.py", "train_context_zs3setting.py", "torchrun", "trainer.multiseed",
        "trainer.aggregate", "trainer.figures", "predict.py", "build_embeddings.py", "convert_official_checkpoint.py",
        "data_loader.verify", "benchmarks.run", "benchmarks.gpu_acceptance"}


@pytest.mark.parametrize("name", sorted({name for _, name, _, _ in CASES}))
def test_every_flag_of_every_documented_command_is_an_option_of_its_parser(name):
    bad = []
    for doc, command, sub, tokens in CASES:
        if command != name:
            continue
        options = _options(name, sub)
        bad += [f"{doc}: {name} {token}" for token in tokens
                if re.fullmatch(r"--?[A-Za-z][\w-]*(=.*)?", token) and token.split("=", 1)[0] not in options]
    assert not bad, "flags the docs use that the parser does not have:\n" + "\n".join(sorted(set(bad)))


def test_every_config_module_file_and_link_the_docs_name_exists():
    problems = []
    for doc in DOCS:
        text = doc.read_text()
        for path in set(re.findall(r"(?<![\w/])configs/[\w./{},-]+\.json", text)):
            braces = re.search(r"\{([^{}]*)\}", path)
            paths = [path[:braces.start()] + part + path[braces.end():] for part in braces.group(1).split(",")] \
                if braces else [path]
            problems += [f"{doc.name}: {p}" for p in paths if not (ROOT / p).is_file()]
        for module in set(re.findall(r"python3?\s+-m\s+([\w.]+)", text)):
            if module not in ("pytest", "venv", "pip") and importlib.util.find_spec(module) is None:
                problems.append(f"{doc.name}: python -m {module}")
        for script in set(re.findall(r"(?:python3?|torchrun)\s+(?:\S+\s+)*?([\w-]+\.py)\b", text)):
            if not (ROOT / script).is_file():
                problems.append(f"{doc.name}: {script}")
        for path in set(re.findall(r"`((?:base|configs|data_loader|model|segmentation|trainer|utils|benchmarks|tests|"
                                   r"docs|\.ci)/[\w./-]+\.(?:py|json|md|png)|\.ci/run)(?:::\w+)?`", text)):
            if not (ROOT / path).exists():
                problems.append(f"{doc.name}: {path}")
        for link in set(re.findall(r"\]\(([^)#\s]+)(?:#[\w-]*)?\)", text)):
            if not link.startswith("http") and not (doc.parent / link).exists():
                problems.append(f"{doc.name}: link {link}")
    assert not problems, "named in the docs but missing:\n" + "\n".join(sorted(problems))


# --- the Python blocks ------------------------------------------------------------------------------
BLOCKS = [(doc, block) for doc in DOCS for block in re.findall(r"```python\n(.*?)```", doc.read_text(), re.S)]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """A working directory as after the demo: ``saved/synthetic_zs3/<run>`` (the demo config, one
    short epoch on a few images), ``photo.png`` (a demo image) and ``extra.npy`` with two named rows."""
    from PIL import Image

    from trainer.cli import main
    tmp = tmp_path_factory.mktemp("docs")
    overrides = ["data.synthetic.num_train=24", "data.synthetic.num_val=4", f"data.synthetic.cache_dir={tmp / 'cache'}",
                 "data_loader.batch_size=4", "data_loader.val_batch_size=4", f"trainer.save_dir={tmp / 'saved'}",
                 "trainer.epochs=1", "trainer.tensorboard=false"]
    argv = ["-c", str(ROOT / "configs" / "config_synthetic_zs3setting.json"), "-d", "cpu", "--run_id", "docs"]
    assert main(argv=argv + [token for o in overrides for token in ("-o", o)]) == 0
    image = next((tmp / "cache").rglob("val_000001.png"))
    Image.open(image).save(tmp / "photo.png")
    np.save(tmp / "extra.npy", np.random.default_rng(0).standard_normal((2, 300)).astype(np.float32) * 0.05)
    (tmp / "extra.classes.txt").write_text("purple solid\npurple checker\n")
    return tmp


def test_the_docs_hold_python_blocks():
    assert len(BLOCKS) >= 3 and all(">>>" in block for _, block in BLOCKS)


@pytest.mark.parametrize("doc,block", BLOCKS, ids=[f"{d.name}-{i}" for i, (d, _) in enumerate(BLOCKS)])
def test_every_python_block_runs_and_shows_what_it_prints(doc, block, demo_run, monkeypatch):
    monkeypatch.chdir(demo_run)
    source = block.replace("<run>", "docs")
    test = doctest.DocTestParser().get_doctest(source, {}, doc.name, str(doc), 0)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    output: list[str] = []
    runner.run(test, out=output.append)
    assert runner.failures == 0, "".join(output)
