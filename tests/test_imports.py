"""The files import one another one way: model.py and data.py import nothing of ours, and no
file imports, directly or through others, a file that imports it (read from the source)."""

import ast
import os

from conftest import ROOT

MODULES = {f[:-3] for f in os.listdir(ROOT) if f.endswith(".py")}


def our_imports(name):
    """The project modules that name.py imports anywhere in it (top level or inside a function)."""
    tree = ast.parse(open(os.path.join(ROOT, f"{name}.py")).read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & MODULES - {name}


def test_model_and_data_import_nothing_of_ours():
    assert our_imports("model") == set() and our_imports("data") == set()


def test_no_file_imports_a_file_that_imports_it():
    graph = {m: our_imports(m) for m in MODULES}
    done, path = set(), []

    def visit(m):  # depth first: meeting a module already on the path is a cycle
        assert m not in path, f"import cycle: {' -> '.join(path[path.index(m):] + [m])}"
        if m not in done:
            path.append(m)
            for n in sorted(graph[m]):
                visit(n)
            path.pop()
            done.add(m)

    for m in sorted(MODULES):
        visit(m)
    assert graph["train"] >= {"model", "data", "instruct", "prompt", "capfilt"}  # the graph was read
