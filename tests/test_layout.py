"""The layout's contracts: common/ never imports projects/, and no shared code names a project, so a
new method is one new folder (the tests and the benchmark find it through its project.yaml)."""
import ast
from pathlib import Path

from common.project_index import projects

ROOT = Path(__file__).resolve().parent.parent


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):  # lazy imports inside functions too
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
    return out


def test_common_and_launchers_never_import_a_project():
    for folder in ("common", "launchers"):
        for f in (ROOT / folder).rglob("*.py"):
            bad = {m for m in _imports(f) if m == "projects" or m.startswith("projects.")}
            assert not bad, f"{f.relative_to(ROOT)} imports {sorted(bad)}"


def test_shared_code_names_no_method():
    """Outside docstrings and comments, common/ and launchers/ hold no method's name."""
    names = set(projects("method"))
    assert names
    for folder in ("common", "launchers"):
        for f in (ROOT / folder).rglob("*.py"):
            tree = ast.parse(f.read_text())
            strings = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
            docs = {ast.get_docstring(n, clean=False) for n in ast.walk(tree)
                    if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))}
            code_strings = strings - docs
            idents = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
            hits = {m for m in names for s in code_strings | idents if m in s.lower()}
            assert not hits, f"{f.relative_to(ROOT)} names {sorted(hits)}"
