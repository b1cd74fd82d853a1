"""docs/architecture.md says, for every module of the package, what it may import from it: the imports found in
the code (module-level and inside functions) must agree with the page, and every module must be on it."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "wsi_il"
PAGE = REPO / "docs" / "architecture.md"


def modules() -> dict[str, Path]:
    """Every module of the package by its dotted name below ``wsi_il`` (``desk.server``; packages' __init__ and
    ``__main__`` left out)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name in ("__init__.py", "__main__.py"):
            continue
        found[".".join(path.relative_to(PACKAGE).with_suffix("").parts)] = path
    return found


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The package's modules that a file imports, anywhere in it."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.startswith("wsi_il"):
            base = node.module.removeprefix("wsi_il").lstrip(".")
            for alias in node.names:  # `from wsi_il import heads` names a module; `from wsi_il.x import f` not
                full = f"{base}.{alias.name}" if base else alias.name
                names.add(full if full in known else base)
        elif isinstance(node, ast.Import):
            names.update(a.name.removeprefix("wsi_il.") for a in node.names if a.name.startswith("wsi_il."))
    return {n for n in names if n in known}


def declared() -> list[tuple[int, list[str], str]]:
    """(layer, modules, what they may import) of each row of the page's table."""
    rows, layer = [], -1
    for line in PAGE.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 4 or not re.search(r"`[a-z_.]+`", cells[1]):
            continue
        if cells[0]:
            layer = int(cells[0].split(":")[0])
        rows.append((layer, re.findall(r"`([a-z_.]+)`", cells[1]), cells[3]))
    return rows


def allowed(rule: str, layer: int, layers: dict[str, int]) -> set[str]:
    """The modules a rule of the page names: "everything", "the layers below", "–", and lists of modules (with
    remarks in brackets), e.g. "the layers below, session" or "sheet (lazily), png"."""
    if rule == "everything":
        return set(layers)
    if rule in ("–", "-", ""):
        return set()
    names: set[str] = set()
    for item in re.sub(r"\([^)]*\)", "", rule).split(","):  # "sheet (lazily)" -> "sheet"
        item = item.strip()
        if item == "the layers below":
            names |= {m for m, at in layers.items() if at < layer}
        elif item:
            names.add(item)
    return names


def test_every_module_is_on_the_architecture_page():
    listed = {m for _, names, _ in declared() for m in names}
    missing = sorted(set(modules()) - listed)
    assert not missing, f"modules missing from docs/architecture.md: {missing}"
    stale = sorted(listed - set(modules()))
    assert not stale, f"docs/architecture.md names modules that do not exist: {stale}"


def test_each_module_imports_only_what_the_page_allows():
    found = modules()
    layers = {m: layer for layer, names, _ in declared() for m in names}
    wrong = []
    for layer, names, rule in declared():
        permitted = allowed(rule, layer, layers)
        for name in names:
            extra = imports_of(found[name], set(found)) - permitted - {name}
            if extra:
                wrong.append(f"{name} imports {', '.join(sorted(extra))} (the page allows: {rule})")
    assert not wrong, "\n".join(wrong)
