"""The package's layers: every import inside `llama_jax` points down the stack, and no module cycle exists.

Read from the source with `ast` (imports inside functions included), so a lazy upward import fails too.
`__main__` modules are entry points (`python -m llama_jax.convert`) and may call into the CLI layer.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import llama_jax

PACKAGE = Path(llama_jax.__file__).resolve().parent
# Bottom to top: a package may import itself and any package before it, never one after it.
LAYERS = ("utils", "parallel", "kernels", "model", "data", "curate", "checkpoint", "convert", "evaluation", "training",
          "cli")
# Libraries that read or write checkpoints: only `llama_jax.checkpoint` may import them, so the on-disk
# format has one owner and every reader goes through its verification.
CHECKPOINT_LIBRARIES = ("orbax", "tensorstore")


def modules() -> dict[str, Path]:
    return {".".join(("llama_jax", *p.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__"): p
            for p in PACKAGE.rglob("*.py")}


def all_imports_of(path: Path, known: set[str]) -> set[str]:
    """Every module `path` imports. `from pkg import sub` counts as importing the submodule `pkg.sub`
    alone when it is a llama_jax module (its package's `__init__` only runs first)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import (the project imports absolutely)"
            submodules = {f"{node.module}.{a.name}" for a in node.names} & known
            found.update(submodules or {node.module})
    return found


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The llama_jax modules `path` imports."""
    return {name for name in all_imports_of(path, known) if name.startswith("llama_jax.")}


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {name: {m for m in imports_of(path, set(known)) if m in known and m != name} for name, path in known.items()}


def test_every_module_belongs_to_a_layer():
    loose = sorted(m for m in modules() if m != "llama_jax" and layer_of(m) is None)
    assert not loose, f"modules outside the layer packages {LAYERS}: {loose}"


def test_imports_only_go_down():
    upward = []
    for module, targets in import_graph().items():
        if module.endswith(".__main__") or module == "llama_jax":
            continue
        rank = LAYERS.index(layer_of(module))
        upward += [f"{module} -> {t}" for t in sorted(targets) if LAYERS.index(layer_of(t)) > rank]
    assert not upward, "upward imports:\n" + "\n".join(upward)


def checkpoint_library_importers(paths: dict[str, Path]) -> list[str]:
    """`module -> library` for each module outside `llama_jax.checkpoint` importing a checkpoint library."""
    found = []
    for module, path in paths.items():
        if layer_of(module) == "checkpoint":
            continue
        found += [f"{module} -> {name}" for name in sorted(all_imports_of(path, set(paths)))
                  if name.split(".")[0] in CHECKPOINT_LIBRARIES]
    return found


def test_only_the_checkpoint_package_imports_orbax_or_tensorstore():
    assert not (found := checkpoint_library_importers(modules())), "checkpoint libraries imported outside " \
        "llama_jax.checkpoint:\n" + "\n".join(found)


def test_no_import_cycle():
    graph = import_graph()
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt] if nxt in path else path + [nxt]
            if nxt not in state and (cycle := visit(nxt, path + [nxt])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            raise AssertionError("import cycle: " + " -> ".join(cycle))


def test_the_checks_see_a_planted_upward_import_and_cycle(tmp_path, monkeypatch):
    """Positive control: the same walkers flag an upward import and a cycle written into copies of modules."""
    fake = {"llama_jax.model.a": "from llama_jax.training import loop\nfrom llama_jax.model import b\n",
            "llama_jax.model.b": "def f():\n    from llama_jax.model.a import g\n"}
    paths = {}
    for name, text in fake.items():
        paths[name] = tmp_path / (name.rsplit(".", 1)[1] + ".py")
        paths[name].write_text(text)
    graph = {name: imports_of(path, set(fake) | {"llama_jax.training.loop"}) for name, path in paths.items()}
    assert "llama_jax.training.loop" in graph["llama_jax.model.a"]  # model -> training: upward
    assert LAYERS.index(layer_of("llama_jax.training.loop")) > LAYERS.index("model")
    assert "llama_jax.model.a" in graph["llama_jax.model.b"] and "llama_jax.model.b" in graph["llama_jax.model.a"]


def test_the_check_sees_a_planted_orbax_import(tmp_path):
    """Positive control: a lazy `from orbax.checkpoint import v1` in a converter is flagged, in the checkpoint
    package it is not."""
    planted = tmp_path / "ours.py"
    planted.write_text("def f():\n    from orbax.checkpoint import v1\n    import tensorstore as ts\n")
    assert checkpoint_library_importers({"llama_jax.convert.ours": planted}) == [
        "llama_jax.convert.ours -> orbax.checkpoint", "llama_jax.convert.ours -> tensorstore"]
    assert checkpoint_library_importers({"llama_jax.checkpoint.orbax_io": planted}) == []


def test_the_architecture_doc_describes_every_layer_package_in_order():
    """docs/architecture.md's layer table has one row per package of LAYERS, bottom to top (a package
    added, or left out of the table as `curate` once was, fails here)."""
    doc = (PACKAGE.parent / "docs" / "architecture.md").read_text(encoding="utf-8")
    assert re.findall(r"^\| `(\w+)/` \| ", doc, re.M) == list(LAYERS)


def route_blocks(doc: str) -> dict[str, str]:
    """{route title: its text} of architecture.md's routes section: a bold title, then its steps."""
    section = doc.split("## Three routes through the code", 1)[1].split("\n## ", 1)[0]
    parts = re.split(r"^\*\*(.+?)\*\* \((.+?)\):$", section, flags=re.M)
    return {f"{title} ({count})": body for title, count, body in zip(parts[1::3], parts[2::3], parts[3::3])}


def files_named(text: str) -> dict[str, Path]:
    """{file name: path} of every `package/file.py` the text names (a later bare `file.py` is the same one)."""
    return {Path(p).name: PACKAGE / p for p in re.findall(r"`(\w+/\w+\.py)`", text)}


def test_the_documented_routes_name_real_code_in_at_most_four_files():
    """Each route (a training step, the attention choice, a checkpoint's write and read) names files that
    exist and functions or classes that those files define, and a reader opens at most 4 files, as
    many as its title says (the largest count it gives). Renaming or moving a step of a route without the
    doc fails here."""
    blocks = route_blocks((PACKAGE.parent / "docs" / "architecture.md").read_text(encoding="utf-8"))
    assert len(blocks) == 3, list(blocks)
    for title, body in blocks.items():
        files = files_named(body)
        for name, path in files.items():
            assert path.is_file(), f"{title}: {path} does not exist"
        # `file.py` `Name.attr` or `file.py` `name`: the file defines Name (the first component)
        for file, symbol in re.findall(r"`(?:\w+/)?(\w+\.py)` `(\w+)", body):
            source = files[file].read_text(encoding="utf-8")
            assert re.search(rf"^\s*(?:def|class) {symbol}\b", source, re.M), f"{title}: {file} has no {symbol}"
        items = re.split(r"^(?:\d+\.|-) ", body, flags=re.M)[1:]
        counts = [len({Path(f).name for f in re.findall(r"`(?:\w+/)?(\w+\.py)`", item)}) for item in items]
        opened = len(files) if title.startswith(("A training step", "The attention choice")) else max(counts)
        assert opened <= 4, f"{title}: {opened} files"
        said = max(int(n) for n in re.findall(r"(\d+) files", title))  # "3 files; 4 for evaluation": 4
        assert said == opened, f"{title}: the route opens {opened} files"
