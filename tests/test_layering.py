"""The import rules of docs/architecture.md, checked on the source with ``ast`` (lazy imports included)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("protocols", "distill", "client", "coordinator", "compliance", "simulations", "serving", "fedistill")
SCENARIO_MODULES = ("simulations.hospitals", "simulations.drug_reviews", "simulations.scenarios")


def imports_of(path: Path) -> set[str]:
    """Every module ``path`` imports, at module level or inside a function."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def violations(package: str, forbidden: tuple[str, ...]) -> list[str]:
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for module in sorted(imports_of(path)):
            if module.split(".")[0] in forbidden:
                bad.append(f"{path.relative_to(ROOT)} imports {module}")
    return bad


@pytest.mark.parametrize(("package", "forbidden"), [
    ("compliance", ("client", "coordinator", "fedistill", "simulations", "serving")),
    # A deployable student reads a finished run: the coordinator's checkpoint format, never a site or the CLI.
    ("serving", ("client", "simulations", "fedistill")),
    ("client", ("coordinator", "simulations", "fedistill", "compliance", "serving")),
    ("coordinator", ("client", "simulations", "fedistill", "compliance", "serving")),
    ("protocols", tuple(p for p in PACKAGES if p != "protocols")),
    ("distill", tuple(p for p in PACKAGES if p not in ("distill", "protocols"))),
])
def test_package_imports_follow_the_layers(package: str, forbidden: tuple[str, ...]) -> None:
    assert violations(package, forbidden) == []


def test_the_scenario_dataclasses_do_not_import_the_scenarios() -> None:
    imported = imports_of(ROOT / "simulations" / "scenario.py")
    assert not {m for m in imported if m.startswith(SCENARIO_MODULES)}


def test_imports_of_sees_lazy_imports(tmp_path: Path) -> None:
    source = tmp_path / "lazy.py"
    source.write_text("def f():\n    from client.budget import decide\n    import coordinator.rounds\n")
    assert {"client.budget", "client.budget.decide", "coordinator.rounds"} <= imports_of(source)
