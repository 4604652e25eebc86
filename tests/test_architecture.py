"""The package's structure, as an executable contract (the README's "Package map" lists the same tiers).

Every module under ``medseg/`` is parsed with ``ast`` (imports inside functions count too) and mapped
to a tier; the rules:

* **tiers**: a module imports from lower tiers and from its own component (``medseg.data.*`` from
  ``medseg.data``), never from a higher tier or from another component of its own tier;
* **no private imports**: no module imports an underscore name from another module
  (``from medseg.metrics.pixel import _helper``) or reaches one through a module it imported
  (``pixel._helper``); ``__version__`` and other dunders aside;
* **small modules**: no module over :data:`MAX_LINES` lines, no exemptions.

Each checker takes the package folder, so the tests at the bottom plant a violation of each rule in a
small package of their own and show the checker catching it.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "medseg"

#: lowest first; a component is a top-level module (``io``) or a subpackage (``data``: every ``medseg.data.*``)
TIERS: list[list[str]] = [
    ["registry", "runtime", "io", "lesion"],
    ["config"],
    ["data", "models", "transforms", "tracking", "metrics"],
    ["inference"],
    ["evaluation", "predict"],
    ["training"],
    ["cli"],
    ["__main__"],
]

MAX_LINES = 500


def modules(package: Path = PACKAGE) -> dict[str, Path]:
    """``<pkg>.x.y`` → file, for every module of the package at ``package``."""
    out = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def component(module: str) -> str:
    """``medseg.data.loading`` → ``data``; the package itself (``medseg``, its ``__version__``) → ``""``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def tier(module: str, tiers: list[list[str]] = TIERS) -> int:
    comp = component(module)
    if comp == "":
        return 0  # medseg/__init__.py imports nothing
    for i, names in enumerate(tiers):
        if comp in names:
            return i
    raise AssertionError(f"{module} is in no tier: add {comp!r} to TIERS here and to the README's Package map")


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    is_pkg = path.name == "__init__.py"
    base = module.split(".")[: len(module.split(".")) - node.level + is_pkg]
    return ".".join(base + ([node.module] if node.module else []))


def imports(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package's modules that ``path`` imports (anywhere in the file, relative imports resolved)."""
    root = module.split(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            name = _resolve(module, path, node)
            found.add(name)
            # "from medseg import io" imports the module medseg.io
            found |= {f"{name}.{a.name}" for a in node.names if f"{name}.{a.name}" in known}
    return {m for m in found if m == root or m.startswith(root + ".")}


def tier_violations(package: Path = PACKAGE, tiers: list[list[str]] = TIERS) -> list[str]:
    known = modules(package)
    out = []
    for name, path in known.items():
        t, comp = tier(name, tiers), component(name)
        for dep in sorted(imports(name, path, known)):
            dep_t, dep_comp = tier(dep, tiers), component(dep)
            if dep_t > t or (dep_t == t and dep_comp not in (comp, "")):
                out.append(f"{name} (tier {t}) imports {dep} (tier {dep_t})")
    return out


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_imports(package: Path = PACKAGE) -> list[str]:
    """Every underscore name one module takes from another (by import or by attribute of an imported module)."""
    known = modules(package)
    root = package.name
    out = []
    for name, path in known.items():
        tree = ast.parse(path.read_text(), str(path))
        module_aliases: dict[str, str] = {}  # local name → imported package module
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                src = _resolve(name, path, node)
                if not (src == root or src.startswith(root + ".")):
                    continue
                for a in node.names:
                    if f"{src}.{a.name}" in known:
                        module_aliases[a.asname or a.name] = f"{src}.{a.name}"
                    elif _private(a.name) and src != name:
                        out.append(f"{name} imports {src}.{a.name}")
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name in known and a.asname:
                        module_aliases[a.asname] = a.name
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and _private(node.attr):
                base = node.value
                dotted = []
                while isinstance(base, ast.Attribute):
                    dotted.append(base.attr)
                    base = base.value
                if not isinstance(base, ast.Name):
                    continue
                target = module_aliases.get(base.id)
                if target is None and base.id == root:  # import medseg.x.y; medseg.x.y._z
                    target = ".".join([root, *reversed(dotted)])
                if target in known and target != name:
                    out.append(f"{name} uses {target}.{node.attr}")
    return out


def oversize(package: Path = PACKAGE, limit: int = MAX_LINES) -> list[str]:
    return [f"{p.relative_to(package.parent)}: {n} lines" for p in sorted(package.rglob("*.py"))
            if (n := len(p.read_text().splitlines())) > limit]


# ----------------------------------------------------------------------------- the rules on medseg


def test_every_module_has_a_tier_and_every_tier_name_exists() -> None:
    known = modules()
    assert len(known) > 30
    for name in known:
        tier(name)
    assert {c for names in TIERS for c in names} <= {component(m) for m in known}


def test_only_the_foundation_sits_at_the_top_of_the_package() -> None:
    top = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__", "__main__", "cli"}
    assert top == set(TIERS[0]), f"top-level modules besides the foundation: {sorted(top - set(TIERS[0]))}"
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert folders == {c for names in TIERS[1:] for c in names} - {"cli", "__main__"}


def test_no_module_imports_from_a_higher_tier_or_a_sibling_component() -> None:
    found = tier_violations()
    assert not found, "import-layer violations:\n" + "\n".join(found)


def test_no_module_imports_another_modules_private_names() -> None:
    found = private_imports()
    assert not found, "private names used across modules (make them public or move the code):\n" + "\n".join(found)


def test_no_module_is_over_the_size_limit() -> None:
    found = oversize()
    assert not found, f"modules over {MAX_LINES} lines (split them by concern):\n" + "\n".join(found)


def test_readme_lists_the_same_tiers() -> None:
    readme = (PACKAGE.parent / "README.md").read_text()
    section = readme.split("## Package map", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|") for line in section.splitlines() if re.match(r"\| \d+ \|", line)]
    listed = [[name.rstrip("/").removesuffix(".py") for name in re.findall(r"`([^`]+)`", row[2])] for row in rows]
    assert listed == TIERS


# ----------------------------------------------------------------------------- each rule fails on a planted violation


def _plant(tmp_path: Path, files: dict[str, str]) -> Path:
    pkg = tmp_path / "medseg"
    for rel, src in {"__init__.py": "", "io.py": "def write():\n    pass\n", "data/__init__.py": "",
                     "data/base.py": "def _helper():\n    pass\n", "cli.py": "", **files}.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(src)
    return pkg


TOY_TIERS = [["io"], ["data"], ["training"], ["cli"]]


def test_the_tier_rule_catches_an_upward_import_even_inside_a_function(tmp_path: Path) -> None:
    clean = _plant(tmp_path / "a", {"training/__init__.py": "from medseg.data.base import collate\n"})
    assert tier_violations(clean, TOY_TIERS) == []
    bad = _plant(tmp_path / "b", {"training/__init__.py": "",
                                  "data/loading.py": "def f():\n    from medseg.training import Trainer\n"})
    assert tier_violations(bad, TOY_TIERS) == ["medseg.data.loading (tier 1) imports medseg.training (tier 2)"]


def test_the_private_rule_catches_imported_and_attribute_access(tmp_path: Path) -> None:
    clean = _plant(tmp_path / "a", {"data/loading.py": "from medseg import __version__\nfrom medseg.io import write\n"})
    assert private_imports(clean) == []
    bad = _plant(tmp_path / "b", {
        "data/loading.py": "from .base import _helper\n",
        "data/other.py": "from medseg.data import base as b\n\ndef f():\n    return b._helper()\n",
        "data/third.py": "import medseg.data.base\n\nx = medseg.data.base._helper\n",
    })
    assert sorted(private_imports(bad)) == ["medseg.data.loading imports medseg.data.base._helper",
                                            "medseg.data.other uses medseg.data.base._helper",
                                            "medseg.data.third uses medseg.data.base._helper"]


def test_the_size_rule_catches_a_long_module(tmp_path: Path) -> None:
    pkg = _plant(tmp_path, {"data/big.py": "x = 1\n" * (MAX_LINES + 1)})
    assert oversize(pkg) == [f"medseg/data/big.py: {MAX_LINES + 1} lines"]
    assert oversize(_plant(tmp_path / "small", {})) == []
