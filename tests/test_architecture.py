"""The import layers of medseg, as a contract (the README's "Architecture" section lists the same tiers).

Every module under ``medseg/`` is parsed with ``ast`` (imports inside functions count too) and
mapped to a tier; a module may import from lower tiers and from its own component (``medseg.data.*``
from ``medseg.data``), never from a higher tier or from another component of its own tier.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "medseg"

#: lowest first; a component is a module (``engine``) or a subpackage (``data``: every ``medseg.data.*``)
TIERS: list[list[str]] = [
    ["registry", "schema", "runtime", "measure", "stats"],
    ["config"],
    ["tracking", "metrics", "em_metrics", "losses", "crf", "transforms", "models", "data", "optim", "budget",
     "operating_point"],
    ["checkpoint", "lesion_eval", "froc"],
    ["inference", "eval_suite", "visualize"],
    ["evaluation", "compare", "predict"],
    ["calibration"],
    ["engine"],
    ["cli"],
    ["__main__"],
]

#: the large data modules and the metrics are out of the size limit's scope (for now)
MAX_LINES = 500
OVERSIZE = {"data/synthetic.py", "data/dicom.py", "data/deeplesion.py", "data/folder.py", "metrics.py"}


def _modules() -> dict[str, Path]:
    """``medseg.x.y`` → file, for every module of the package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _component(module: str) -> str:
    """``medseg.data.loading`` → ``data``; the package itself (``medseg``, its ``__version__``) → ``""``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _tier(module: str) -> int:
    comp = _component(module)
    if comp == "":
        return 0  # medseg/__init__.py imports nothing
    for i, names in enumerate(TIERS):
        if comp in names:
            return i
    raise AssertionError(f"{module} is in no tier: add {comp!r} to TIERS here and to the README's Architecture")


def _imports(module: str, path: Path) -> set[str]:
    """The ``medseg`` modules ``path`` imports (anywhere in the file, relative imports resolved)."""
    is_pkg = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")[: len(module.split(".")) - node.level + is_pkg]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.add(name)
            # "from medseg import engine" imports the module medseg.engine
            found |= {f"{name}.{a.name}" for a in node.names if f"{name}.{a.name}" in _modules()}
    return {m for m in found if m == "medseg" or m.startswith("medseg.")}


def test_every_module_has_a_tier() -> None:
    modules = _modules()
    assert len(modules) > 30
    for name in modules:
        _tier(name)
    # every component named in TIERS exists (a renamed module must be renamed here too)
    components = {_component(m) for m in modules}
    assert {c for names in TIERS for c in names} <= components


def test_no_module_imports_from_a_higher_tier_or_a_sibling_component() -> None:
    violations = []
    for name, path in _modules().items():
        tier, comp = _tier(name), _component(name)
        for dep in sorted(_imports(name, path)):
            dep_tier, dep_comp = _tier(dep), _component(dep)
            if dep_tier > tier or (dep_tier == tier and dep_comp not in (comp, "")):
                violations.append(f"{name} (tier {tier}) imports {dep} (tier {dep_tier})")
    assert not violations, "import-layer violations:\n" + "\n".join(violations)


def test_the_checker_sees_imports_inside_functions(tmp_path: Path) -> None:
    src = "import os\n\ndef f():\n    from medseg.engine import Trainer\n    from . import base\n"
    path = tmp_path / "loading.py"
    path.write_text(src)
    assert _imports("medseg.data.loading", path) == {"medseg.engine", "medseg.data", "medseg.data.base"}


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_modules_stay_small(path: Path) -> None:
    rel = path.relative_to(PACKAGE).as_posix()
    if rel in OVERSIZE:
        pytest.skip("out of the size limit's scope")
    n = len(path.read_text().splitlines())
    assert n <= MAX_LINES, f"medseg/{rel} has {n} lines (limit {MAX_LINES}): split it by concern"


def test_readme_lists_the_same_tiers() -> None:
    import re

    readme = (PACKAGE.parent / "README.md").read_text()
    section = readme.split("## Architecture", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|") for line in section.splitlines() if re.match(r"\| \d+ \|", line)]
    listed = [[name.rstrip("/") for name in re.findall(r"`([^`]+)`", row[2])] for row in rows]
    assert listed == TIERS
