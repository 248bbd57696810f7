"""The documentation matches the code.

- the site (MkDocs, ``mkdocs.yml``) builds with warnings as errors, API reference included;
- every Python code block of the README, CONTRIBUTING.md and the hand-written pages under
  ``docs/`` runs (a block whose first line is ``# fragment`` is only compiled);
- every config key those pages name exists in the typed configs;
- every ``mimlab`` command they show exists, with the options it is shown with;
- the README is a front page (at most 150 lines) whose links and figures point at files that
  exist.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from mimlab.cli import CONFIGS, build_parser
from mimlab.core.config import describe

ROOT = Path(__file__).resolve().parents[1]
# pages written by hand; docs/results/** and docs/performance.md are written by code
GENERATED = ("docs/results/", "docs/performance.md")
PAGES = sorted(
    [ROOT / "README.md", ROOT / "CONTRIBUTING.md"]
    + [
        p
        for p in (ROOT / "docs").rglob("*.md")
        if not str(p.relative_to(ROOT)).startswith(GENERATED)
    ]
)
README_MAX_LINES = 150


def rel(p: Path) -> str:
    return str(p.relative_to(ROOT))


# ----------------------------------------------------------------------------- parsing
FENCE = re.compile(r"^([ \t]*)```([\w+-]*)[^\n]*\n(.*?)^\1```[ \t]*$", re.M | re.S)


def code_blocks(text: str) -> list[tuple[str, str]]:
    """(language, dedented body) of every fenced block."""
    out = []
    for m in FENCE.finditer(text):
        indent = m.group(1)
        body = "".join(
            line[len(indent) :] if line.startswith(indent) else line
            for line in m.group(3).splitlines(keepends=True)
        )
        out.append((m.group(2).lower(), body))
    return out


def inline_code(text: str) -> list[str]:
    """Inline code spans outside fenced blocks (a span may wrap over a line break)."""
    text = FENCE.sub("", text)
    return [" ".join(s.split()) for s in re.findall(r"(?<!`)`([^`]+)`(?!`)", text)]


# ------------------------------------------------------------------------- config keys
SECTIONS = sorted({k.split(".", 1)[0] for cls in CONFIGS.values() for k, *_ in describe(cls)})
KEYS = {k for cls in CONFIGS.values() for k, *_ in describe(cls)}
KEY = re.compile(r"(?<![\w./-])(" + "|".join(SECTIONS) + r")\.([a-z_][a-z0-9_]*)\b")
# file names that look like keys: model.safetensors, log.txt, data.md, ...
FILE_EXTENSIONS = {"md", "py", "txt", "json", "jsonl", "csv", "yaml", "png", "pt", "safetensors"}


def named_keys(text: str) -> set[str]:
    return {".".join(m.groups()) for m in KEY.finditer(text) if m.group(2) not in FILE_EXTENSIONS}


# named on purpose as a wrong key: the did-you-mean example of docs/reliability.md
WRONG_ON_PURPOSE = {"optim.epoch"}


def unknown_keys(text: str) -> list[str]:
    return sorted(named_keys(text) - KEYS - WRONG_ON_PURPOSE)


# ---------------------------------------------------------------------------- commands
def _subcommands(parser) -> dict:
    import argparse

    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            return dict(a.choices)
    return {}


PARSER = build_parser()
BOOTSTRAP_JOBS = {"demo", "test", "install", "mimlab"}


def command_lines(text: str) -> list[str]:
    """Shell lines and inline spans that run mimlab (continuation lines joined)."""
    lines = []
    for lang, body in code_blocks(text):
        if lang in ("bash", "sh", "shell", "console", ""):
            body = body.replace("\\\n", " ")
            lines += [re.sub(r"(^|\s)#.*$", "", ln) for ln in body.splitlines()]  # comments
    lines += inline_code(text)
    return [ln.strip() for ln in lines if re.search(r"\bmimlab(\.cli)?\s|bootstrap\.sh\s", ln)]


def check_command(line: str) -> list[str]:
    """Problems of one command line: unknown command, sub-command or option."""
    problems = []
    start = re.search(r"(?:^|[\s(])(\./bootstrap\.sh|-m\s+mimlab\.cli|mimlab)\s+(.*)$", line)
    if not start:
        return problems
    prog, rest = start.group(1), start.group(2)
    try:
        tokens = shlex.split(rest, comments=True)
    except ValueError:
        tokens = rest.split()
    tokens = [t.strip("[]") for t in tokens]
    if prog == "./bootstrap.sh":
        if not tokens or tokens[0] not in BOOTSTRAP_JOBS:
            return [f"./bootstrap.sh job {tokens[:1]} (jobs: {sorted(BOOTSTRAP_JOBS)})"]
        if tokens[0] in ("test", "install"):
            return problems
        if tokens[0] == "mimlab":
            tokens = tokens[1:]  # ./bootstrap.sh mimlab <command> ...
    if not tokens or tokens[0].startswith(("<", "...")) or tokens[0] in ("[", "-"):
        return problems
    parser, path = PARSER, []
    while True:
        subs = _subcommands(parser)
        if not subs or not tokens or tokens[0].startswith("-"):
            break
        name = tokens.pop(0)
        if name not in subs:
            return [f"`mimlab {' '.join(path + [name])}`: no such command"]
        parser, path = subs[name], path + [name]
    options = set(parser._option_string_actions)
    for t in tokens:
        if t.startswith("--") and t.split("=", 1)[0] not in options:
            problems.append(f"`mimlab {' '.join(path)}`: no option {t.split('=', 1)[0]}")
    return problems


# ----------------------------------------------------------------------------- tests
def test_pages_are_found():
    names = {rel(p) for p in PAGES}
    assert {"README.md", "CONTRIBUTING.md", "docs/getting-started.md"} <= names
    assert not any(n.startswith(GENERATED) for n in names)


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_config_keys_named_in_docs_exist(page):
    assert unknown_keys(page.read_text()) == []


def test_key_check_can_fail():
    assert unknown_keys("set `optim.epochz=3` and `data.kind=wds`") == ["optim.epochz"]
    assert (
        unknown_keys("`mimlab.data.batch`, `mimlab/data/shards.py`, model.safetensors, (data.md)")
        == []
    )


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_commands_named_in_docs_exist(page):
    problems = [p for line in command_lines(page.read_text()) for p in check_command(line)]
    assert problems == []


def test_command_check_can_fail():
    assert check_command("mimlab pretrian --data x")
    assert check_command("mimlab analyze ckaa")
    assert check_command("./bootstrap.sh demo --no-such-option")
    assert check_command("./bootstrap.sh deploy")
    assert not check_command("mimlab analyze cka --data d --checkpoints a b --images 16")
    assert not check_command("torchrun --nproc_per_node=2 -m mimlab.cli pretrain --data DIR x=1")


def test_docs_show_commands_and_keys():
    """The checks above are not vacuous: the pages name many commands and keys."""
    text = "\n".join(p.read_text() for p in PAGES)
    lines = [ln for p in PAGES for ln in command_lines(p.read_text())]
    assert len(lines) > 50
    assert len(named_keys(text) & KEYS) > 60


PY_BLOCKS = [
    (p, body) for p in PAGES for lang, body in code_blocks(p.read_text()) if lang == "python"
]


def test_python_blocks_exist():
    runnable = [b for _, b in PY_BLOCKS if not b.startswith("# fragment")]
    assert len(runnable) >= 6


@pytest.mark.parametrize("page", sorted({p for p, _ in PY_BLOCKS}), ids=rel)
def test_python_blocks_run(page, tmp_path, monkeypatch):
    """The Python blocks of a page run in order in one namespace, in an empty folder."""
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__docs__"}
    for i, body in enumerate(b for p, b in PY_BLOCKS if p == page):
        code = compile(body, f"{rel(page)}[python block {i}]", "exec")
        if body.startswith("# fragment"):
            continue  # a piece of a larger file: compiled only
        exec(code, namespace)


def test_docs_build_strictly(tmp_path):
    """``mkdocs build --strict``: broken links, missing anchors, griffe docstring warnings and
    unresolved cross-references fail; the generated references are there."""
    site = tmp_path / "site"
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml")]
        + ["-d", str(site)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "WARNING" not in out, out[-4000:]
    config = (site / "reference" / "config" / "index.html").read_text()
    assert all(k in config for k in ("optim.epochs", "method.mask_ratio", "probe.lrs"))
    assert "--shard-size" in (site / "reference" / "cli" / "index.html").read_text()
    api = (site / "reference" / "api" / "mimlab.core.config" / "index.html").read_text()
    assert "round-trip to YAML" in api  # the module docstring, rendered by mkdocstrings
    assert "Add a method family" in (site / "contributing" / "index.html").read_text()


# ------------------------------------------------------------------------------ README
def test_readme_is_a_front_page():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, len(lines)


def test_readme_links_and_figures_exist():
    text = (ROOT / "README.md").read_text()
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    local = [t.split("#")[0] for t in targets if not re.match(r"[a-z]+:", t) and t[0] != "#"]
    assert local, "the README links into the docs"
    assert [t for t in local if not (ROOT / t).exists()] == []
