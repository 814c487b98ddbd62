"""The commands, snippets, paths and links of README.md and docs/*.md stay true as written.

Fast checks (no training, no model): every repository path a doc names exists; every markdown link to a
repository file resolves (and its #anchor names a heading); every fenced python snippet compiles; every
`memsparse-eval` command parses and its tasks, lengths, depths and sweeps are valid; every `memsparse-train` command
names a real subcommand, an existing recipe and keys the CLI has (checked against the classes' signatures, without
importing Lightning); every `benchmarks/` script a command runs exists and takes the flags given to it.
Slow checks: every `memsparse-train` command through the real LightningCLI parser, and the README's and
docs/evaluation.md's python snippets run on a tiny model.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import re
import shlex
import typing
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINKED_DOCS = [*DOCS, ROOT / "benchmarks" / "results" / "README.md"]
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.S | re.M)
INLINE = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")
PROGRAMS = ("memsparse-train", "memsparse-eval", "memsparse-export")


def _rel(p: Path) -> str:
    return str(p.relative_to(ROOT))


def fenced(lang: str) -> list[tuple[str, str]]:
    return [(_rel(d), m.group(2)) for d in DOCS for m in FENCE.finditer(d.read_text()) if m.group(1) == lang]


def _segments(text: str) -> list[list[str]]:
    """Shell text -> simple commands (lists of words): continuations joined, comments dropped, split at && || ; |."""
    text = text.replace("\\\n", " ").replace("$(which memsparse-train)", "memsparse-train")
    out = []
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            words = shlex.split(line, comments=True)
        except ValueError:  # an unbalanced quote: not a command
            continue
        cmd: list[str] = []
        for w in words:
            if w in ("&&", "||", ";", "|"):
                out.append(cmd)
                cmd = []
            else:
                cmd.append(w)
        out.append(cmd)
    return [c for c in out if c]


def commands() -> list[tuple[str, list[str]]]:
    """(doc, words from the program on) for every command in a fenced bash block or an inline code span that
    starts with a program (optionally after VAR=value assignments, srun, timeout N); an inline span's doc name
    ends in " (inline)"."""
    found = []
    for d in DOCS:
        text = d.read_text()
        blocks = [m.group(2) for m in FENCE.finditer(text) if m.group(1) in ("bash", "sh", "")]
        prose = FENCE.sub("", text)
        spans = [m.group(1) for m in INLINE.finditer(prose)]
        for chunk, where in [(b, _rel(d)) for b in blocks] + [(s, _rel(d) + " (inline)") for s in spans]:
            for cmd in _segments(chunk):
                i = 0
                while i < len(cmd) and (re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", cmd[i]) or cmd[i] in ("srun", "env")):
                    i += 1
                if i < len(cmd) - 1 and cmd[i] == "timeout":
                    i += 2
                cmd = cmd[i:]
                if cmd and (cmd[0] in PROGRAMS or (cmd[0] in ("python", "python3", "bash") and len(cmd) > 1
                                                   and cmd[1].startswith("benchmarks/"))):
                    found.append((where, cmd))
    return found


def _program(name: str) -> list[tuple[str, list[str]]]:
    return [(d, c) for d, c in commands() if c[0] == name]


# ---------------------------------------------------------------------------------------------- paths and links

PATH = re.compile(r"(?<![\w./-])((?:recipes|benchmarks|docs|tests|kernels|memsparse|train|eval)/[\w./-]*\w)(\*?)")
EXTS = (".py", ".sh", ".yaml", ".yml", ".md", ".json", ".csv", ".png", ".log", ".txt", ".toml")


def test_the_docs_are_found():
    assert len(DOCS) >= 8 and len(fenced("bash")) >= 10 and len(_program("memsparse-train")) >= 10
    assert len(_program("memsparse-eval")) >= 4


@pytest.mark.parametrize("doc", DOCS, ids=_rel)
def test_named_repository_paths_exist(doc):
    missing = []
    for m in PATH.finditer(doc.read_text()):
        path, star = m.group(1), m.group(2)
        if star:
            if not list(ROOT.glob(path + "*")):
                missing.append(path + "*")
        elif path.endswith(EXTS) and not (ROOT / path).exists():
            missing.append(path)
    assert not missing, f"{_rel(doc)} names files that do not exist: {sorted(set(missing))}"


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    s = re.sub(r"[`*_]", "", heading.strip().lower())
    s = re.sub(r"[^\w\- ]", "", s)
    return s.replace(" ", "-")


def _anchors(md: Path) -> set[str]:
    text = FENCE.sub("", md.read_text())
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*$", text, re.M)}


@pytest.mark.parametrize("doc", LINKED_DOCS, ids=_rel)
def test_markdown_links_resolve(doc):
    bad = []
    for m in re.finditer(r"\]\(([^)\s]+)\)", FENCE.sub("", doc.read_text())):
        target = m.group(1)
        if re.match(r"[a-z]+://|mailto:", target):
            continue
        path, _, anchor = target.partition("#")
        dest = (doc.parent / path).resolve() if path else doc
        if not dest.exists():
            bad.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            bad.append(f"{target} (no heading #{anchor})")
    assert not bad, f"{_rel(doc)}: broken links: {bad}"


# ------------------------------------------------------------------------------------------------- python snippets

@pytest.mark.parametrize("doc,code", fenced("python"), ids=lambda x: x if isinstance(x, str) and x.endswith(".md")
                         else "")
def test_python_snippets_compile(doc, code):
    compile(code, f"<{doc} snippet>", "exec")


# --------------------------------------------------------------------------------------------------- memsparse-eval

def test_eval_commands_parse_and_their_plans_are_valid():
    from memsparse.eval.cli import build_parser
    from memsparse.eval.harness import (
        check_plan,
        parse_budget,
        parse_consolidation,
        parse_depths,
        parse_lengths,
        parse_sweep,
        parse_tasks,
    )

    from memsparse.tokenizer import ByteTokenizer

    parser = build_parser()
    for doc, cmd in _program("memsparse-eval"):
        if len(cmd) == 1 or "--help" in cmd:  # the program's name in prose
            continue
        args = cmd[1:]
        for flag in ("--checkpoint", "--out"):  # prose that shows only the flags it explains
            if flag not in args:
                args = [*args, flag, "x"]
        try:
            ns = parser.parse_args(args)
        except SystemExit:
            known = parser._option_string_actions
            if doc.endswith("(inline)") and all(
                    f in known for w in args if w.startswith("--") for f in w.split("/")):
                continue  # prose naming a flag without its value
            pytest.fail(f"{doc}: memsparse-eval does not accept: {shlex.join(cmd)}")
        tasks, lengths = parse_tasks(ns.tasks), parse_lengths(ns.lengths)
        parse_depths(ns.depths)
        if ns.sweep:
            parse_sweep(ns.sweep)
        if ns.budget_policy:
            parse_budget(ns.budget_policy)
        if ns.consolidation:
            parse_consolidation(ns.consolidation)
        if ns.checkpoint.startswith("outputs/quickstart"):  # the quickstart trains with the byte tokenizer
            check_plan(tasks, lengths, ByteTokenizer())


# -------------------------------------------------------------------------------------------------- memsparse-train

def _init_params(path: Path, cls: str) -> set[str]:
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == cls:
            for f in node.body:
                if isinstance(f, ast.FunctionDef) and f.name == "__init__":
                    a = f.args
                    return {x.arg for x in [*a.posonlyargs, *a.args, *a.kwonlyargs]} - {"self"}
    raise AssertionError(f"no {cls}.__init__ in {path}")


@cache
def _lightning_file(rel: str) -> Path:
    spec = importlib.util.find_spec("lightning")  # locates the package without importing it
    assert spec is not None and spec.submodule_search_locations
    return Path(next(iter(spec.submodule_search_locations))) / rel


def _dataclass_keys(cls: type, keys: list[str]) -> str | None:
    """None when the dotted `keys` name a field path of the dataclass `cls`, else the first unknown key."""
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    if keys[0] not in fields:
        return keys[0]
    if len(keys) > 1:
        t = hints[keys[0]]
        inner = [a for a in typing.get_args(t) if dataclasses.is_dataclass(a)] or [t]
        if dataclasses.is_dataclass(inner[0]):
            bad = _dataclass_keys(inner[0], keys[1:])
            return None if bad is None else f"{keys[0]}.{bad}"
    return None


TOP_LEVEL = {"config", "print_config", "help", "ckpt_path", "overwrite", "seed_everything", "debug"}


def _unknown_train_key(key: str) -> str | None:
    from memsparse.config import ModelConfig

    parts = key.split(".")
    head, rest = parts[0], parts[1:]
    if not rest:
        return None if head in TOP_LEVEL else head
    if head == "trainer":
        known = _init_params(_lightning_file("pytorch/trainer/trainer.py"), "Trainer")
    elif head == "model":
        if rest[0] == "config" and len(rest) > 1:
            bad = _dataclass_keys(ModelConfig, rest[1:])
            return None if bad is None else f"model.config.{bad}"
        known = _init_params(ROOT / "train" / "module.py", "MemSparseLightningModule")
    elif head == "data":
        known = _init_params(ROOT / "train" / "data.py", "MemSparseDataModule")
    elif head == "checkpoint":
        known = _init_params(_lightning_file("pytorch/callbacks/model_checkpoint.py"), "ModelCheckpoint")
    elif head == "last_checkpoint":
        known = _init_params(ROOT / "train" / "callbacks.py", "LastCheckpoint")
    else:
        return key
    return None if rest[0] in known else f"{head}.{rest[0]}"


def test_train_commands_name_real_subcommands_recipes_and_keys():
    problems = []
    for doc, cmd in _program("memsparse-train"):
        if len(cmd) < 2 or cmd[1] in ("--help", "-h"):  # the program's name in prose
            continue
        if cmd[1] not in ("fit", "validate", "test", "predict"):
            problems.append(f"{doc}: unknown subcommand in {shlex.join(cmd)}")
            continue
        for i, w in enumerate(cmd[2:], start=2):
            if not w.startswith("--"):
                continue
            key = w[2:].split("=", 1)[0]
            bad = _unknown_train_key(key)
            if bad:
                problems.append(f"{doc}: --{key}: no key {bad!r} ({shlex.join(cmd)})")
            if key == "config" and i + 1 < len(cmd) and cmd[i + 1].startswith("recipes/"):
                if "<" not in cmd[i + 1] and not (ROOT / cmd[i + 1]).is_file():
                    problems.append(f"{doc}: no recipe {cmd[i + 1]}")
    assert not problems, "\n".join(problems)


# ------------------------------------------------------------------------------------------------------- benchmarks

def test_benchmark_commands_name_scripts_and_flags_that_exist():
    problems = []
    for doc, cmd in commands():
        if cmd[0] not in ("python", "python3", "bash"):
            continue
        script = ROOT / cmd[1]
        if not script.is_file():
            problems.append(f"{doc}: no script {cmd[1]}")
            continue
        if script.suffix == ".py":
            source = script.read_text()
            for w in cmd[2:]:
                if w.startswith("--"):
                    flag = w.split("=", 1)[0]
                    if f'"{flag}"' not in source and f"'{flag}'" not in source:
                        problems.append(f"{doc}: {cmd[1]} has no flag {flag}")
    assert not problems, "\n".join(problems)


# --------------------------------------------------------------------------------------------------- slow: run them

@pytest.mark.slow
def test_train_commands_parse_with_the_real_cli(monkeypatch):
    from memsparse.train import cli as train_cli

    monkeypatch.setenv("WANDB_MODE", "offline")

    class Parsed(Exception):
        pass

    class ParseOnly(train_cli.MemSparseCLI):
        def _parse_ckpt_path(self):
            raise Parsed(self)

    monkeypatch.setattr(train_cli, "MemSparseCLI", ParseOnly)  # cli() builds it by this name
    try:
        train_cli.cli(["fit", "--config", str(ROOT / "recipes" / "quickstart.yaml")])
    except Parsed as e:
        parser = e.args[0].parser
    else:
        raise AssertionError("the CLI did not stop after parsing")
    failures = []
    for doc, cmd in _program("memsparse-train"):
        args = [a for a in cmd[1:] if a != "--debug"]
        if not args or args[0] in ("--help", "-h") or "--help" in args or "--print_config" in args:
            continue
        for i, a in enumerate(args):  # a placeholder config (my_run.yaml): the quickstart recipe
            if a == "--config" and i + 1 < len(args) and not (ROOT / args[i + 1]).is_file():
                args[i + 1] = str(ROOT / "recipes" / "quickstart.yaml")
            elif a == "--config":
                args[i + 1] = str(ROOT / args[i + 1])
        try:
            parser.parse_args(args)
        except SystemExit:
            failures.append(f"{doc}: {shlex.join(cmd)}")
    assert not failures, "memsparse-train does not accept:\n" + "\n".join(failures)


@pytest.mark.slow
def test_readme_python_snippet_runs():
    ((doc, code),) = [(d, c) for d, c in fenced("python") if d == "README.md"]
    exec(compile(code, f"<{doc} snippet>", "exec"), {})


@pytest.mark.slow
def test_evaluation_python_snippet_runs(tmp_path, monkeypatch):
    import torch

    from memsparse.config import MemoryConfig, ModelConfig
    from memsparse.model import MemSparseLM

    ((doc, code),) = [(d, c) for d, c in fenced("python") if d == "docs/evaluation.md"]
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=259, dim=32, depth=2, segment=64, window=128, block_size=16, variant="mac",
                      memory=MemoryConfig(heads=2, head_dim=16, chunk_size=64))
    export = tmp_path / "outputs" / "quickstart" / "export"
    MemSparseLM(cfg).save_pretrained(export)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"<{doc} snippet>", "exec"), {})
    assert (tmp_path / "outputs" / "quickstart" / "eval_python" / "results.csv").is_file()
