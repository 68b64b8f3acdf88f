"""The package as a user sees it: the public API, the import graph, one version."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pipeline

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "pipeline"
# Presentation: text tables, figures, web pages. The model layer computes; it never formats or draws.
PRESENTATION = {
    "pipeline.tables",
    "pipeline.plots",
    "pipeline.web.report",
    "pipeline.web.render",
    "pipeline.web.serve",
    "pipeline.study_report",
}


def test_every_public_name_resolves() -> None:
    for name in pipeline.__all__:
        assert getattr(pipeline, name) is not None, name


def test_the_library_leaves_the_import_system_alone() -> None:
    """Only the cnncodes command puts lean_imports' finder in place; importing the library does not."""
    ran = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, pipeline.heads, pipeline.train; "
            "print([type(f).__name__ for f in sys.meta_path if 'Sklearn' in type(f).__name__])",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    assert ran.stdout.strip() == "[]"


def test_importing_the_package_imports_no_library() -> None:
    ran = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, pipeline; print(sorted(m for m in sys.modules if m in "
            "('numpy', 'h5py', 'sklearn', 'tensorflow', 'keras', 'PIL')))",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    assert ran.stdout.strip() == "[]"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """The pipeline modules a module imports anywhere (top level or inside functions)."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            candidates = [target] + [f"{target}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        else:
            continue
        found |= {c for c in candidates if c.startswith("pipeline.") and _exists(c)}
    return found - {module}


def _exists(module: str) -> bool:
    path = ROOT.joinpath(*module.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def import_graph() -> dict[str, set[str]]:
    """Each module of pipeline/ -> the pipeline modules it imports (package __init__ files left out)."""
    return {_module_name(p): _imports(p) for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"}


def test_no_import_cycle_among_pipeline_modules() -> None:
    graph = import_graph()
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for child in sorted(graph.get(node, ())):
            if state.get(child) == 1:
                raise AssertionError("import cycle: " + " -> ".join(trail[trail.index(child) :] + [child]))
            if child not in state:
                visit(child, trail + [child])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    """The pipeline modules start imports, directly or through others."""
    reached, todo = set(), [start]
    while todo:
        for child in graph.get(todo.pop(), ()):
            if child not in reached:
                reached.add(child)
                todo.append(child)
    return reached


def test_heads_import_no_presentation_module() -> None:
    reached = reachable(import_graph(), "pipeline.heads")
    assert not reached & PRESENTATION, sorted(reached & PRESENTATION)


def test_finetune_and_the_library_import_no_command_module() -> None:
    """finetune builds its model with the shared Keras head (keras_head), not through the export command."""
    graph = import_graph()
    assert "pipeline.export" not in reachable(graph, "pipeline.finetune")
    library = [m for m in graph if m not in ("pipeline.cli", "pipeline.__main__")]
    assert "pipeline.cli" not in set().union(*(reachable(graph, m) for m in library))  # the CLI calls the library


def test_one_version() -> None:
    text = (ROOT / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in text and 'attr = "pipeline.__version__"' in text


def test_a_wheel_installs_only_the_pipeline_package(tmp_path: Path) -> None:
    """pip builds a wheel of the checkout: one top-level package and the cnncodes script (no `cli` module)."""
    import shutil
    import zipfile

    source = tmp_path / "source"  # a copy: setuptools leaves build/ and *.egg-info where it builds
    shutil.copytree(ROOT / "pipeline", source / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(source)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if built.returncode != 0 and "Could not find a version" in built.stderr + built.stdout:
        import pytest

        pytest.skip("pip cannot fetch setuptools to build the wheel (offline without a package index)")
    assert built.returncode == 0, built.stderr[-2000:]
    wheel = next(tmp_path.glob("cnncodes-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"pipeline"}, top
    assert {
        "pipeline/cache/writer.py",
        "pipeline/web/templates/serve.html",
        "pipeline/skops_trusted_types.json",
        "pipeline/cli.py",
    } <= set(names)
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "cnncodes = pipeline.cli:app" in entry_points


def test_the_command_runs_from_another_folder(tmp_path: Path) -> None:
    ran = subprocess.run(
        [sys.executable, "-m", "pipeline", "--help"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**__import__("os").environ, "PYTHONPATH": str(ROOT)},
        timeout=120,
    )
    assert ran.returncode == 0 and "train" in ran.stdout and "fit-head" in ran.stdout, ran.stderr
