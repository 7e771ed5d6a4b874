"""The test tiers hold: every test that needs a real server carries the ``integration`` (or ``e2e``) marker.

``make test-fast`` runs ``pytest -m "not integration and not e2e"``; a server test without its marker would make
the fast tier start SeaweedFS, MLflow or Ray. Checked statically (no collection, no imports): a test needs a server
when it requests one of the server fixtures of ``tests/conftest.py``, directly or through a fixture of its module.
"""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent
SERVER_FIXTURES = {"stack_config", "s3_server", "mlflow_server", "ray_cluster", "platform_env"}
TIER_MARKS = {"integration", "e2e"}


def _marks(node: ast.AST) -> set[str]:
    """Names of ``pytest.mark.X`` in a decorator list or a ``pytestmark = ...`` value."""
    return {n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Attribute)
            and n.value.attr == "mark"}


def _args(fn: ast.FunctionDef) -> set[str]:
    return {a.arg for a in (*fn.args.posonlyargs, *fn.args.args, *fn.args.kwonlyargs)}


def _is_fixture(fn: ast.FunctionDef) -> bool:
    return any("fixture" in ast.unparse(d) for d in fn.decorator_list)


def test_conftest_defines_the_server_fixtures() -> None:
    tree = ast.parse((TESTS / "conftest.py").read_text())
    fixtures = {n.name for n in tree.body if isinstance(n, ast.FunctionDef) and _is_fixture(n)}
    assert SERVER_FIXTURES <= fixtures, SERVER_FIXTURES - fixtures


def test_every_server_test_is_marked() -> None:
    unmarked = []
    for path in sorted(TESTS.glob("test_*.py")):
        tree = ast.parse(path.read_text())
        module_marks: set[str] = set()
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "pytestmark" for t in node.targets):
                module_marks |= _marks(node.value)
        functions = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)]
        needs = set(SERVER_FIXTURES)
        changed = True
        while changed:  # module fixtures that (transitively) request a server fixture
            changed = False
            for fn in functions:
                if _is_fixture(fn) and fn.name not in needs and _args(fn) & needs:
                    needs.add(fn.name)
                    changed = True
        for fn in functions:
            if fn.name.startswith("test_") and _args(fn) & needs:
                if not (module_marks | _marks(ast.Module(body=fn.decorator_list, type_ignores=[]))) & TIER_MARKS:
                    unmarked.append(f"{path.name}::{fn.name}")
    assert not unmarked, f"tests that start servers without @pytest.mark.integration: {unmarked}"
