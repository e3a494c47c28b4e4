"""The house's arrows for decoding and evaluation, read from the source's import statements (not by importing):
`infer/` imports nothing from data/ nor from any folder after it; `eval/` imports nothing from post/."""

import ast
import os

import pytest

PKG = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "mantis_jax")
ORDER = ("config", "data", "model", "parallel", "train", "infer", "memory", "engine", "control", "eval", "post")


def imported_folders(folder: str) -> dict[str, set[str]]:
    """file -> the mantis_jax folders (or top-level modules) its import statements name, relative ones resolved."""
    out = {}
    root = os.path.join(PKG, folder)
    for dirpath, _, files in os.walk(root):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(dirpath, name)
            package = ["mantis_jax"] + os.path.relpath(dirpath, PKG).split(os.sep)
            names = set()
            for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
                if isinstance(node, ast.Import):
                    mods = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    base = package[:len(package) - node.level + 1] if node.level else []
                    mod = ".".join(base + ([node.module] if node.module else []))
                    mods = [f"{mod}.{a.name}" for a in node.names]
                else:
                    continue
                for m in mods:
                    parts = m.split(".")
                    if parts[0] == "mantis_jax" and len(parts) > 1:
                        names.add(parts[1])
            out[os.path.relpath(path, PKG)] = names
    return out


@pytest.mark.parametrize("folder, forbidden", [
    ("infer", set(ORDER[ORDER.index("infer") + 1:]) | {"data", "demo"}),
    ("eval", {"post", "demo"}),
])
def test_folder_imports_point_one_way(folder, forbidden):
    found = imported_folders(folder)
    assert found, f"no files under mantis_jax/{folder}"
    bad = {f: sorted(names & forbidden) for f, names in found.items() if names & forbidden}
    assert not bad, f"imports against the arrows: {bad}"


def test_the_parser_sees_imports_of_every_form(tmp_path, monkeypatch):
    monkeypatch.setattr(__import__(__name__), "PKG", str(tmp_path))
    (tmp_path / "infer").mkdir()
    (tmp_path / "infer" / "a.py").write_text("import mantis_jax.data.factworld\n")
    (tmp_path / "infer" / "b.py").write_text("from mantis_jax import data\n")
    (tmp_path / "infer" / "c.py").write_text("from ..data import factworld\n")
    (tmp_path / "infer" / "d.py").write_text("def f():\n    from mantis_jax.eval.qa import x\n")
    (tmp_path / "infer" / "e.py").write_text("from . import decode\nimport numpy\n")
    found = imported_folders("infer")
    assert found == {"infer/a.py": {"data"}, "infer/b.py": {"data"}, "infer/c.py": {"data"},
                     "infer/d.py": {"eval"}, "infer/e.py": {"infer"}}
