"""The README's layout table is the tree: every module of the packages has its row, every row
names a path that exists."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_the_readme_layout_table_matches_the_tree():
    readme = (REPO / "README.md").read_text()
    table = readme[readme.index("## Layout") :].split("\n## ")[0]
    named = {
        path.rstrip("/")
        for row in table.splitlines()
        if row.startswith("| `")
        for path in re.findall(r"`([^`]+)`", row.split(" | ")[0])
    }
    modules = {
        str(path.relative_to(REPO))
        for package in ("pipeline", "trainer")
        for path in (REPO / package).glob("*.py")
        if path.name != "__init__.py"
    }
    assert modules <= named, f"modules without a row: {sorted(modules - named)}"
    missing = sorted(path for path in named if not (REPO / path).exists())
    assert not missing, f"rows of paths that do not exist: {missing}"
