"""MkDocs hook: pages generated from the code, so that nothing is written twice.

- ``reference/config.md``: every config key with its type, defaults and meaning, from the typed
  configs (``mimlab.core.config``, the ``doc(...)`` of each field: the same source as
  ``mimlab <command> --help``);
- ``reference/cli.md``: every command and its options, from the argument parser
  (``mimlab.cli.build_parser``);
- ``reference/api/<module>.md``: one mkdocstrings page per module of the package, added to
  the navigation under "API reference";
- in hand-written pages, ``<!-- mimlab:family NAME -->`` becomes the family's presets and the
  ``method.*`` fields it reads (``mimlab.core.registry``), ``<!-- mimlab:model-presets -->``
  the model presets table.
"""

from __future__ import annotations

import os
import pkgutil
import re
import sys
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # document this checkout's package, installed or not
    sys.path.insert(0, str(ROOT))

API_DIR = "reference/api"
API_NAV_TITLE = "API reference"

# commands whose options are config keys (their --help epilog is the config reference)
CONFIG_COMMANDS = ("pretrain", "finetune", "linprobe", "knn")


# ----------------------------------------------------------------------------- API pages
def api_modules() -> list[str]:
    """Every module of the package, sorted (``mimlab``, ``mimlab.analysis``, ...)."""
    import mimlab

    names = ["mimlab"] + [m.name for m in pkgutil.walk_packages(mimlab.__path__, "mimlab.")]
    return sorted(names)


def _api_index(mods: list[str]) -> str:
    lines = [
        "# API reference",
        "",
        "Generated from the docstrings of the package (mkdocstrings). The layers are described",
        "in [Contributing](../../contributing.md); `mimlab.core.moved` keeps the old flat import",
        "paths working.",
        "",
        "| module | first line of its docstring |",
        "|---|---|",
    ]
    import importlib

    for m in mods:
        doc = (importlib.import_module(m).__doc__ or "").strip().split("\n\n")[0]
        doc = " ".join(doc.split()).replace("|", "\\|")
        lines.append(f"| [`{m}`]({m}.md) | {doc} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------ config reference
def _md(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def config_rows() -> dict[str, dict[str, dict]]:
    """{section: {key: {"type", "doc", "defaults": {command: default}}}} over every command."""
    from mimlab.cli import CONFIGS
    from mimlab.core.config import describe

    out: dict[str, dict[str, dict]] = {}
    for command, cls in CONFIGS.items():
        for key, tp, default, docs in describe(cls):
            section = key.split(".", 1)[0]
            row = out.setdefault(section, {}).setdefault(
                key, {"type": tp, "doc": docs, "defaults": {}}
            )
            row["defaults"][command] = default
    return out


def config_reference() -> str:
    from mimlab.cli import CONFIGS
    from mimlab.core.registry import reading_families

    commands = list(CONFIGS)
    lines = [
        "# Configuration reference",
        "",
        "Generated from the typed configs (`mimlab/core/config.py`, the `doc(...)` of each field),",
        "the same source as `mimlab <command> --help`. Set a key with `key=value` on the command",
        "line or in a YAML file passed with `--config`; `--print-config` shows the resolved",
        "config. Resolution order: dataclass defaults, then `--config`, then `key=value`",
        "overrides, then the model preset (`model.preset`) fills every model field not set",
        "explicitly, and the method preset (`method.name`) every method field not set.",
        "",
        "A default shown for one command only differs between commands; a dash means that the",
        "command has no such key. `method.*` fields list the method families that read them; a",
        "field set for a family that does not read it is an error.",
        "",
    ]
    for section, rows in config_rows().items():
        used = [c for c in commands if any(c in r["defaults"] for r in rows.values())]
        lines += [f"## `{section}`", ""]
        if len(used) < len(commands):
            lines += [f"Used by: {', '.join(f'`mimlab {c}`' for c in used)}.", ""]
        lines += ["| key | type | default | meaning |", "|---|---|---|---|"]
        for key, r in rows.items():
            values = [r["defaults"][c] for c in used if c in r["defaults"]]
            if len(set(values)) == 1 and len(values) == len(used):
                default = f"`{values[0]}`"
            else:
                default = "<br>".join(
                    f"{c}: `{r['defaults'][c]}`" if c in r["defaults"] else f"{c}: -" for c in used
                )
            meaning = _md(r["doc"])
            if key.startswith("method.") and key != "method.name":
                meaning += " *(read by " + ", ".join(reading_families(key.split(".", 1)[1])) + ")*"
            lines.append(
                f'| <a id="{key}"></a>`{key}` | `{_md(r["type"])}` | {default} | {meaning} |'
            )
        lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------- CLI reference
def cli_reference() -> str:
    import argparse

    from mimlab.cli import build_parser

    os.environ["COLUMNS"] = "100"  # argparse wraps help to the terminal width
    parser = build_parser()
    lines = [
        "# Command-line reference",
        "",
        "Generated from the argument parser (`mimlab/cli.py`, `mimlab/analysis/cli.py`): what",
        "`mimlab <command> --help` prints. For `pretrain`, `finetune`, `linprobe` and `knn` the",
        "list of configuration keys is in the [configuration reference](config.md).",
        "",
        "```text",
        parser.format_help().rstrip(),
        "```",
        "",
    ]

    def walk(p: argparse.ArgumentParser, path: list[str]) -> None:
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sp in action.choices.items():
                    text = sp.format_help()
                    if path == [] and name in CONFIG_COMMANDS:
                        text = text.split("configuration keys (")[0].rstrip() + (
                            "\n\nconfiguration keys: see the configuration reference\n"
                        )
                    title = " ".join(["mimlab", *path, name])
                    lines.extend([f"## `{title}`", "", "```text", text.rstrip(), "```", ""])
                    walk(sp, [*path, name])

    walk(parser, [])
    return "\n".join(lines)


# ------------------------------------------------------------------- blocks in hand pages
def family_block(name: str) -> str:
    from mimlab.core.config import MethodConfig, describe
    from mimlab.core.registry import FAMILIES, PRESETS, presets_of

    if name not in FAMILIES:
        raise KeyError(f"<!-- mimlab:family {name} -->: no such family ({', '.join(FAMILIES)})")
    fam = FAMILIES[name]
    docs = {k.split(".", 1)[1]: (tp, d, doc) for k, tp, d, doc in describe(MethodConfig, "m.")}
    lines = [
        f"**Family `{fam.name}`** ({fam.title}): {_md(fam.about)}",
        "",
        "| preset (`method.name=`) | what it is | values |",
        "|---|---|---|",
    ]
    for p in presets_of(fam.name):
        values = ", ".join(f"`{k}={v}`" for k, v in PRESETS[p].values.items())
        lines.append(f"| `{p}` | {_md(PRESETS[p].about)} | {values} |")
    lines += [
        "",
        "Fields it reads:",
        "",
        "| field | type | default | meaning |",
        "|---|---|---|---|",
    ]
    for f in sorted(fam.reads - {"name"}):
        tp, default, doc = docs[f]
        lines.append(f"| `method.{f}` | `{_md(tp)}` | `{default}` | {_md(doc)} |")
    return "\n".join(lines) + "\n"


def model_presets_block() -> str:
    from mimlab.core.config import MODEL_PRESETS

    keys = list(next(iter(MODEL_PRESETS.values())))
    lines = [
        "| `model.preset` | " + " | ".join(keys) + " |",
        "|---" * (len(keys) + 1) + "|",
    ]
    for name, values in MODEL_PRESETS.items():
        lines.append(f"| `{name}` | " + " | ".join(str(values.get(k, "")) for k in keys) + " |")
    return "\n".join(lines) + "\n"


MARKER = re.compile(r"<!-- mimlab:(family|model-presets)\s*([\w-]*)\s*-->")


def expand_markers(markdown: str) -> str:
    def sub(m: re.Match) -> str:
        return family_block(m.group(2)) if m.group(1) == "family" else model_presets_block()

    return MARKER.sub(sub, markdown)


# ------------------------------------------------------------------------------- events
def on_config(config):
    """Put one page per module under the "API reference" entry of the navigation."""
    mods = api_modules()
    for i, entry in enumerate(config["nav"]):
        if isinstance(entry, dict) and API_NAV_TITLE in entry:
            config["nav"][i] = {
                API_NAV_TITLE: [{"Overview": f"{API_DIR}/index.md"}]
                + [{m: f"{API_DIR}/{m}.md"} for m in mods]
            }
    return config


def on_files(files, config):
    mods = api_modules()
    for m in mods:
        files.append(File.generated(config, f"{API_DIR}/{m}.md", content=f"::: {m}\n"))
    files.append(File.generated(config, f"{API_DIR}/index.md", content=_api_index(mods)))
    files.append(File.generated(config, "reference/config.md", content=config_reference()))
    files.append(File.generated(config, "reference/cli.md", content=cli_reference()))
    return files


def on_page_markdown(markdown, page, config, files):
    return expand_markers(markdown)
