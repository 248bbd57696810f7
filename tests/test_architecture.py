"""The package's import graph: layers import downward only, no cycles, no hidden imports.

Data flows one way: configuration -> nn parts and data -> model sources and teachers ->
methods -> training and evaluation -> commands -> CLI. Every module of ``mimlab`` is placed in
one layer by :data:`LAYERS`; a module may import its own layer (without cycles) and the layers
below. An import inside a function body must say why on its line (``# lazy: <reason>``):
optional heavy dependencies and CLI start-up speed only.
"""

import ast
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "mimlab"

#: layer -> the folders (or top-level modules) that make it, relative to ``mimlab``. A module's
#: layer is its folder's: one folder is one layer, and the tree reads as the architecture.
LAYERS = {
    0: ["core", "__init__"],
    1: ["nn"],
    2: ["data"],
    3: ["io"],
    4: ["methods"],
    5: ["train"],
    6: ["eval"],
    7: ["analysis"],
    8: ["tasks"],
    9: ["experiments", "demo"],
    10: ["cli"],
}
NAMES = {
    0: "core: configuration",
    1: "nn: network parts",
    2: "data",
    3: "io: weights and files",
    4: "methods",
    5: "train",
    6: "eval",
    7: "analysis",
    8: "tasks",
    9: "commands",
    10: "CLI",
}
#: the whole top of the package: every other module lives in a layer folder
TOP = {"__init__", "tasks", "demo", "cli"}


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for p in sorted(ROOT.rglob("*.py")):
        parts = p.relative_to(ROOT).with_suffix("").parts
        name = (
            ".".join(parts[:-1]) if parts[-1] == "__init__" and len(parts) > 1 else ".".join(parts)
        )
        out[name] = p
    return out


MODULES = _modules()


def layer_of(mod: str) -> int:
    """The layer of ``mimlab.<mod>``: the layer of its top folder (or of a top-level module)."""
    head = mod.split(".")[0]
    for layer, names in LAYERS.items():
        if head in names:
            return layer
    raise AssertionError(
        f"module mimlab.{mod} is in no layer: put it in a layer folder, or add its folder to "
        f"LAYERS in {pathlib.Path(__file__).name}"
    )


def _target(mod: str, node: ast.ImportFrom, is_pkg: bool) -> list[str]:
    """mimlab modules named by a ``from ... import ...`` (relative or absolute)."""
    if node.level:
        pkg = mod.split(".") if is_pkg else mod.split(".")[:-1]
        pkg = pkg[: len(pkg) - (node.level - 1)] if node.level > 1 else pkg
        base = ".".join([*pkg, *(node.module.split(".") if node.module else [])])
    elif node.module and (node.module == "mimlab" or node.module.startswith("mimlab.")):
        base = node.module[len("mimlab.") :] if node.module != "mimlab" else ""
    else:
        return []
    out = []
    for a in node.names:
        sub = f"{base}.{a.name}" if base else a.name
        out.append(sub if sub in MODULES else (base or "__init__"))
    return out


def scan(mod: str, src: str, is_pkg: bool = False):
    """(imported mimlab modules, [(line, text, reason)] of imports inside function bodies)."""
    lines, edges, lazy = src.splitlines(), set(), []

    def visit(node, in_func):
        for ch in ast.iter_child_nodes(node):
            func = in_func or isinstance(ch, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(ch, (ast.Import, ast.ImportFrom)):
                if isinstance(ch, ast.ImportFrom):
                    targets = _target(mod, ch, is_pkg)
                else:
                    targets = [
                        a.name[len("mimlab.") :] for a in ch.names if a.name.startswith("mimlab.")
                    ]
                edges.update(t for t in targets if t != mod)
                if in_func:
                    text = " ".join(lines[ch.lineno - 1 : ch.end_lineno])
                    reason = text.split("# lazy:", 1)[1].strip() if "# lazy:" in text else ""
                    lazy.append((ch.lineno, lines[ch.lineno - 1].strip(), reason))
            else:
                visit(ch, func)

    visit(ast.parse(src), False)
    return edges, lazy


def import_graph():
    """(edges, lazy): edges[mod] = {imported mimlab modules}; lazy = [(mod, line, text,
    reason)] for every import inside a function body."""
    edges, lazy = {}, []
    for mod, path in MODULES.items():
        edges[mod], found = scan(mod, path.read_text(), path.name == "__init__.py")
        lazy += [(mod, *f) for f in found]
    return edges, lazy


def find_cycles(edges) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            strong(v)
    return out


EDGES, LAZY = import_graph()


def test_every_module_has_a_layer():
    for mod in MODULES:
        layer_of(mod)


def test_the_top_holds_only_the_entry_points():
    """Every module but ``__init__``, ``tasks``, ``demo`` and ``cli`` is in a layer folder."""
    loose = sorted(p.stem for p in ROOT.glob("*.py") if p.stem not in TOP)
    assert not loose, f"modules at the top of mimlab/ outside every layer folder: {loose}"
    folders = {p.name for p in ROOT.iterdir() if p.is_dir() and p.name != "__pycache__"}
    in_layers = {n for names in LAYERS.values() for n in names}
    assert folders <= in_layers, f"folders in no layer: {sorted(folders - in_layers)}"


def test_no_import_cycles():
    cycles = find_cycles(EDGES)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_layers_import_downward_only():
    upward = [
        f"mimlab.{a} ({NAMES[layer_of(a)]}) imports mimlab.{b} ({NAMES[layer_of(b)]})"
        for a, bs in EDGES.items()
        for b in sorted(bs)
        if b in MODULES and layer_of(b) > layer_of(a)
    ]
    assert not upward, "\n".join(upward)


def test_imports_inside_functions_say_why():
    silent = [
        f"mimlab/{MODULES[m].relative_to(ROOT)}:{line}: {text}"
        for m, line, text, reason in LAZY
        if not reason
    ]
    assert not silent, (
        "imports inside a function need '# lazy: <reason>' (optional heavy "
        "dependency or CLI start-up speed):\n" + "\n".join(silent)
    )


def test_the_checker_sees_cycles_upward_imports_and_silent_lazy_imports():
    """The checks above can fail: a planted cycle, upward edge and bare lazy import are found."""
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert layer_of("core.config") < layer_of("methods.siamese") < layer_of("cli")
    assert layer_of("analysis.cli") == layer_of("analysis.cka") == layer_of("analysis")
    with pytest.raises(AssertionError, match="in no layer"):
        layer_of("no_such_module")
    with pytest.raises(AssertionError, match="in no layer"):
        layer_of("config")  # the flat layout's module: no longer a layer of its own
    src = (
        "import json\nfrom ..nn.ops import patchify\n\n\ndef f():\n"
        "    from ..train.engine import Engine\n"
        "    import open_clip  # lazy: optional heavy dependency\n"
    )
    edges, lazy = scan("core.config", src)
    assert edges == {"nn.ops", "train.engine"}
    assert [(line, reason) for line, _, reason in lazy] == [
        (6, ""),
        (7, "optional heavy dependency"),
    ]
    assert layer_of("train.engine") > layer_of("core.config")  # the planted edge is upward


def test_contributing_shows_this_map():
    """CONTRIBUTING.md's layer table names every layer folder with its layer number and, where
    it lists a folder's modules, exactly the modules in it."""
    text = (ROOT.parent / "CONTRIBUTING.md").read_text()
    rows = [r for r in text.splitlines() if re.match(r"\| \d+ ", r)]
    seen = {}
    for row in rows:
        layer_cell, where = row.split("|")[1].strip(), row.split("|")[2].strip()
        layer = int(layer_cell.split()[0])
        names = re.findall(r"`([\w.]+)/?`", where)
        head = re.match(r"`([\w.]+)/`:", where)
        for n in names if not head else [head.group(1)]:
            seen[n.removesuffix(".py")] = layer
        if head:  # the folder's modules, listed
            listed = set(names[1:])
            actual = {p.stem for p in (ROOT / head.group(1)).glob("*.py")} - {"__init__"}
            assert listed == actual, f"CONTRIBUTING.md lists {sorted(listed)} for {head.group(1)}/"
    expected = {n: layer for layer, names in LAYERS.items() for n in names if n != "__init__"}
    assert seen == expected, f"CONTRIBUTING.md's map {seen} != LAYERS {expected}"


def report() -> str:
    """The graph in one screen (``python tests/test_architecture.py``)."""
    rows = []
    for layer in sorted(LAYERS):
        mods = sorted(m for m in MODULES if layer_of(m) == layer)
        lines = sum(len(MODULES[m].read_text().splitlines()) for m in mods)
        rows.append(
            f"layer {layer} {NAMES[layer]} ({len(mods)} modules, {lines} lines): " + ", ".join(mods)
        )
    rows.append(
        f"edges: {sum(len(v) for v in EDGES.values())}, cycles: "
        f"{len(find_cycles(EDGES))}, imports inside functions: {len(LAZY)} (all with "
        f"a reason: {all(r for *_, r in LAZY)})"
    )
    return "\n".join(rows)


if __name__ == "__main__":
    print(report())
