"""The dotted paths the README teaches stay importable (the package's public face)."""

import importlib

import pytest


@pytest.mark.parametrize("module, names", [
    ("deep_retrieval.model", ["DescriptorConfig", "build_descriptor_model", "for_inference", "load_descriptor_model"]),
    ("deep_retrieval.layers", ["RMAC", "RegionProposalNetwork", "MultiResolution", "PCAWhitening", "GeMPooling"]),
])
def test_the_readme_names_import_from_their_documented_paths(module, names):
    loaded = importlib.import_module(module)
    for name in names:
        assert callable(getattr(loaded, name)), f"{module}.{name}"


def test_the_top_level_holds_at_most_five_modules_and_no_import_cycle():
    import ast
    import os

    root_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    package = os.path.join(root_dir, "deep_retrieval")
    top = sorted(f for f in os.listdir(package) if f.endswith(".py"))
    assert len(top) <= 5, top
    graph = {}
    for root, _, files in os.walk(package):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(root, f)
                name = os.path.relpath(path, root_dir)[:-3].replace(os.sep, ".").removesuffix(".__init__")
                tree = ast.parse(open(path).read())
                graph[name] = [(n.module, [a.name for a in n.names]) for n in ast.walk(tree)
                               if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("deep_retrieval")]
    # ``from package import module`` reaches the module; anything else the module named.
    graph = {name: {f"{module}.{n}" if f"{module}.{n}" in graph else module for module, names in found for n in names}
             for name, found in graph.items()}
    state = {}

    def visit(node, trail):
        if state.get(node) == "done":
            return
        assert state.get(node) != "open", f"import cycle: {' -> '.join(trail + [node])}"
        state[node] = "open"
        for other in graph.get(node, ()):
            if other in graph and other != node:
                visit(other, trail + [node])
        state[node] = "done"

    for node in graph:
        visit(node, [])
