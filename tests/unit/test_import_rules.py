"""DESIGN.md §3 import rules, checked two ways.

Statically: every ``import``/``from ... import`` in every file of every package, including those inside functions
(lazy imports) and under ``if TYPE_CHECKING:``, and every ``importlib.import_module("...")``, ``__import__("...")``
and ``importlib.util.find_spec("...")`` whose name is a literal (or an f-string with a literal prefix, such as
``f"recipes.{name}"``), against the direction between packages:

- planner imports none of runtime, orchestrator, recipes, kernels, bench, and never torch or ray;
- runtime never imports orchestrator, recipes (a job's recipe is loaded by orchestrator.recipes), bench, ray, pulp;
- kernels import only torch, triton and the standard library;
- recipes never import orchestrator or bench (nor ray: they run inside workers);
- nobody imports bench;
- planner, runtime, kernels and recipes import nothing by a computed name (the test could not check it).

Dynamically, in fresh interpreters: importing a package's modules leaves the forbidden packages out of
``sys.modules``; ``import orchestrator.cli`` loads no torch; ``loom plan`` and ``loom validate`` on an example run
without importing torch; a worker's modules do not load the planner's solver, its API or its MetaGraph builder.

The worker's side (issue 10: a worker runs its payload, runtime.payload): every runtime module a worker process loads
imports nothing of planner.{solver,milp,api} (nor the rest of the solver stack), at module level or inside a function,
and planner.metagraph only for types (``if TYPE_CHECKING:``) or inside the few driver-side functions listed in
:data:`DRIVER_SIDE_METAGRAPH` (that no worker calls them is shown by building and stepping workers with the builder
disabled: tests/unit/runtime/test_gradient_buckets.py, tests/unit/runtime/test_worker_payload.py).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("planner", "runtime", "orchestrator", "kernels", "recipes", "bench")
ML_STACK = ("torch", "ray", "triton", "transformers", "diffusers", "megatron")

# Top-level modules each package must not import (statically). Every package: never bench.
STATIC_FORBIDDEN: dict[str, frozenset[str]] = {
    "planner": frozenset({"runtime", "orchestrator", "recipes", "kernels", "bench", *ML_STACK}),
    "runtime": frozenset({"orchestrator", "recipes", "bench", "ray", "pulp", "highspy"}),
    "recipes": frozenset({"orchestrator", "bench", "ray", "pulp", "highspy"}),
    "orchestrator": frozenset({"bench"}),
    "kernels": frozenset({"bench"}),  # and everything outside KERNELS_MAY_IMPORT
    "bench": frozenset(),
}
KERNELS_MAY_IMPORT = frozenset({"kernels", "torch", "triton", "__future__"}) | frozenset(sys.stdlib_module_names)
NO_COMPUTED_IMPORTS = ("planner", "runtime", "kernels", "recipes")  # orchestrator.recipes loads recipes by name

# What importing every module of a package in a fresh interpreter must leave out of sys.modules.
DYNAMIC_FORBIDDEN: dict[str, tuple[str, ...]] = {
    "planner": ("torch", "ray", "runtime", "orchestrator", "recipes", "kernels", "bench"),
    "runtime": ("ray", "pulp", "highspy", "orchestrator", "recipes", "bench"),
    "kernels": ("ray", "pulp", "planner", "runtime", "orchestrator", "recipes", "bench"),
    "recipes": ("ray", "orchestrator", "bench"),
    "orchestrator": ("bench",),
}
# The planner's solver stack ("workers do not import the planner's solver", issue 10).
SOLVER_MODULES = ("planner.solver", "planner.milp", "planner.patterns", "planner.spindle", "planner.twowave",
                  "planner.polish", "planner.refine", "planner.baselines", "pulp", "highspy")
# What a worker process imports: the actor and the recipe registry, the worker, its payload, its host set-up, a recipe.
WORKER_RUNTIME = ("orchestrator.actors", "orchestrator.recipes", "runtime.payload", "runtime.executor", "runtime.host",
                  "runtime.local_world")
WORKER_MODULES = (*WORKER_RUNTIME, "recipes.medical")
# What a worker never imports, not even inside a function (issue 10); the planner's MetaGraph builder only for types
WORKER_NEVER = ("planner.solver", "planner.milp", "planner.api", *SOLVER_MODULES)
# Functions in modules a worker loads that build a MetaGraph for the driver (file, function): the job's checks and the
# modes' roles, decided once in the driver (runtime.prepare), and twin MetaOps of a job (a payload carries them)
DRIVER_SIDE_METAGRAPH = {("runtime/checks.py", "check_trainable"), ("runtime/rollout.py", "check_modes"),
                         ("runtime/rollout.py", "build"), ("runtime/sampleop.py", "twin_ops")}
DYNAMIC_CALLS = {"import_module", "__import__", "find_spec"}


# --------------------------------------------------------------------------- static: edges from source


@dataclass(frozen=True)
class Edge:
    """One import in a file: ``target`` is the dotted name (a prefix for an f-string), ``how`` is "import",
    "type-only" (under ``if TYPE_CHECKING:``, never run), "lazy import" (inside a function), "dynamic"
    (importlib/__import__/find_spec on a literal) or "computed" (a dynamic import whose name the source does not spell
    out); ``scope``: the function it is in ("" at module level)."""

    file: str
    line: int
    target: str
    how: str
    scope: str = ""

    @property
    def top(self) -> str:
        return self.target.split(".")[0]

    def __str__(self) -> str:
        return f"{self.file}:{self.line} {self.how} {self.target or '<computed>'}"


class _ImportCollector(ast.NodeVisitor):
    def __init__(self, file: str, package: str):
        self.file, self.package, self.depth, self.type_only = file, package, 0, 0
        self.scopes: list[str] = []
        self.edges: list[Edge] = []

    def _add(self, node: ast.AST, target: str, how: str) -> None:
        self.edges.append(Edge(self.file, node.lineno, target, how, self.scopes[-1] if self.scopes else ""))

    def _how(self) -> str:
        return "lazy import" if self.depth else "type-only" if self.type_only else "import"

    def _scoped(self, node: ast.AST) -> None:
        self.depth += 1
        self.scopes.append(getattr(node, "name", "<lambda>"))
        self.generic_visit(node)
        self.scopes.pop()
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _scoped

    def visit_If(self, node: ast.If) -> None:
        test = node.test
        guarded = (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
            isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
        self.visit(node.test)
        self.type_only += guarded
        for child in node.body:
            self.visit(child)
        self.type_only -= guarded
        for child in node.orelse:
            self.visit(child)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(node, alias.name, self._how())

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        target = self.package if node.level else ""  # a relative import stays inside its own package
        target = ".".join(p for p in (target, node.module or "") if p)
        self._add(node, target, self._how())

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
        if name in DYNAMIC_CALLS and node.args:
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                self._add(node, arg.value, "dynamic")
            elif (isinstance(arg, ast.JoinedStr) and arg.values and isinstance(arg.values[0], ast.Constant)
                  and str(arg.values[0].value).strip(".")):
                self._add(node, str(arg.values[0].value).rstrip("."), "dynamic")
            else:
                self._add(node, "", "computed")
        self.generic_visit(node)


def source_edges(source: str, file: str, package: str) -> list[Edge]:
    collector = _ImportCollector(file, package)
    collector.visit(ast.parse(source, file))
    return collector.edges


def package_edges(package: str) -> list[Edge]:
    edges: list[Edge] = []
    for path in sorted((ROOT / package).rglob("*.py")):
        edges += source_edges(path.read_text(), str(path.relative_to(ROOT)), package)
    return edges


def violations(package: str, edges: list[Edge]) -> list[str]:
    bad = []
    for edge in edges:
        if edge.how == "computed":
            if package in NO_COMPUTED_IMPORTS:
                bad.append(f"{edge}: a computed import name cannot be checked; import by a literal name")
            continue
        if edge.top != package and edge.top in STATIC_FORBIDDEN[package] | {"bench"}:
            bad.append(str(edge))
        elif package == "kernels" and edge.top not in KERNELS_MAY_IMPORT:
            bad.append(f"{edge}: kernels import only torch, triton and the standard library")
    return bad


def test_the_collector_finds_every_kind_of_import() -> None:
    """The static check can fail: module-level, lazy, relative, importlib, __import__, find_spec, f-string prefix."""
    source = textwrap.dedent("""\
        import os, torch.nn
        from planner.spec import JobSpec
        from . import sibling
        if TYPE_CHECKING:
            from orchestrator.run import Driver
        def build(job):
            import ray
            from runtime.modules import build_layer
            importlib.import_module(f"recipes.{job.recipe}")
            __import__("pulp")
            importlib.util.find_spec("bench")
            return importlib.import_module(job.name)
        """)
    edges = source_edges(source, "x.py", "runtime")
    assert [(e.target, e.how) for e in edges] == [
        ("os", "import"), ("torch.nn", "import"), ("planner.spec", "import"), ("runtime", "import"),
        ("orchestrator.run", "type-only"), ("ray", "lazy import"), ("runtime.modules", "lazy import"),
        ("recipes", "dynamic"), ("pulp", "dynamic"), ("bench", "dynamic"), ("", "computed"),
    ]
    assert {e.scope for e in edges if e.how in ("lazy import", "dynamic", "computed")} == {"build"}
    flagged = [int(v.split(" ")[0].split(":")[1]) for v in violations("runtime", edges)]
    assert flagged == [5, 7, 9, 10, 11, 12]  # orchestrator, ray, recipes, pulp, bench, a computed name
    kernels = source_edges("import math, torch, triton\nimport numpy\nfrom planner.spec import JobSpec\n", "k.py", "kernels")
    assert [v.split(" ")[0] for v in violations("kernels", kernels)] == ["k.py:2", "k.py:3"]  # numpy, planner


@pytest.mark.parametrize("package", PACKAGES)
def test_imports_follow_the_direction_between_packages(package: str) -> None:
    assert list((ROOT / package).rglob("*.py")), f"no files under {package}/"
    edges = package_edges(package)
    bad = violations(package, edges)
    assert not bad, f"{package} imports what DESIGN.md §3 forbids:\n" + "\n".join(bad)


def test_nobody_imports_bench() -> None:
    bad = [str(e) for p in PACKAGES if p != "bench" for e in package_edges(p) if e.top == "bench"]
    assert not bad, "\n".join(bad)


# --------------------------------------------------------------------------- dynamic: fresh interpreters


PROBE = """
import importlib, json, sys
forbidden, modules = {forbidden!r}, {modules!r}
found = {{}}
for name in modules:
    importlib.import_module(name)
    for f in forbidden:
        if f in sys.modules and f not in found:
            found[f] = name  # the first module whose import brought it in
print(json.dumps(found))
"""


def package_modules(package: str) -> list[str]:
    """The package and every module under it, found on disk (new modules are checked too, nothing is imported here)."""
    modules = set()
    for file in (ROOT / package).rglob("*.py"):
        parts = file.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules.add(".".join(parts))
    return sorted(m for m in modules if not m.endswith("__main__"))


def loaded_by(modules: list[str] | tuple[str, ...], forbidden: tuple[str, ...]) -> dict[str, str]:
    """Import ``modules`` in order in a fresh interpreter: {forbidden module: the module that loaded it first}."""
    probe = PROBE.format(forbidden=forbidden, modules=list(modules))
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_planner_modules_are_found() -> None:
    modules = package_modules("planner")
    assert {"planner.api", "planner.spec", "planner.plan"} <= set(modules)


@pytest.mark.parametrize("package", sorted(DYNAMIC_FORBIDDEN))
def test_package_imports_leave_forbidden_modules_out(package: str) -> None:
    leaked = loaded_by(package_modules(package), DYNAMIC_FORBIDDEN[package])
    assert leaked == {}, f"importing these {package} modules loaded forbidden packages: {leaked}"


def test_planner_api_alone() -> None:
    """The exact check DESIGN.md names: `import planner, planner.api` keeps torch and ray out."""
    assert loaded_by(["planner", "planner.api"], ("torch", "ray")) == {}


def test_the_cli_loads_no_torch_at_import() -> None:
    """`loom --help` and every command's start-up stay light: torch loads only inside commands that train."""
    assert loaded_by(["orchestrator.cli"], ("torch", "ray", "pulp")) == {}


def test_the_runtimes_checks_load_no_torch() -> None:
    """`loom validate` runs runtime.checks (what `loom run` would refuse): it and the use graph stay torch-free."""
    assert loaded_by(["runtime.checks", "planner.usegraph"], ("torch",)) == {}


def test_workers_do_not_import_the_planners_solver_or_metagraph() -> None:
    """Issue 10: a worker runs a Plan; it never loads the solver (MILP, pattern LP, wavefront, baselines, PuLP,
    HiGHS) nor the planner's API, and the worker's own modules (the actor, the recipe registry, the worker and its
    payload) never load planner.metagraph: its MetaOps come from the plan, the modes' roles and twins from its payload.
    (A recipe may: the medical recipe's evaluator imports the single-process reference trainer, which builds one.)"""
    found = loaded_by(WORKER_MODULES, ("planner.metagraph", *WORKER_NEVER))
    assert found.get("planner.metagraph") in (None, *set(WORKER_MODULES) - set(WORKER_RUNTIME)), found
    assert {m: first for m, first in found.items() if m != "planner.metagraph"} == {}


def worker_files() -> list[Path]:
    """Every runtime module a worker may run: those the worker's entry points import, at module level or inside a
    function, followed through runtime's own imports (``from runtime import x`` included)."""
    todo = ["runtime.executor", "runtime.host", "runtime.local_world", "runtime.payload"]
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        path = ROOT / (name.replace(".", "/") + ".py")
        if name in seen or not path.is_file():
            continue
        seen.add(name)
        tree = ast.parse(path.read_text())
        targets = [e.target for e in source_edges(path.read_text(), str(path), "runtime")]
        targets += [f"{n.module}.{a.name}" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module
                    for a in n.names]
        todo += [t for t in targets if t.startswith("runtime.")]
    return [ROOT / (name.replace(".", "/") + ".py") for name in sorted(seen)]


def test_worker_modules_import_no_solver_and_the_metagraph_only_for_types() -> None:
    """Issue 10, statically (lazy imports too): the runtime modules a worker may run never import the solver stack or
    planner.api; planner.metagraph only for types, or inside the driver-side functions of DRIVER_SIDE_METAGRAPH."""
    files = worker_files()
    names = {str(f.relative_to(ROOT)) for f in files}
    assert {"runtime/executor.py", "runtime/payload.py", "runtime/rollout.py", "runtime/megatron_backend.py"} <= names
    edges = [e for f in files for e in source_edges(f.read_text(), str(f.relative_to(ROOT)), "runtime")]
    never = [str(e) for e in edges if any(e.target == m or e.target.startswith(m + ".") for m in WORKER_NEVER)]
    assert not never, "a worker's modules import the solver or the planner's API:\n" + "\n".join(never)
    graph = [e for e in edges if e.target == "planner.metagraph" and e.how != "type-only"]
    assert not [str(e) for e in graph if not e.scope], "a worker's module loads the MetaGraph builder at import"
    assert {(e.file, e.scope) for e in graph} == DRIVER_SIDE_METAGRAPH, [str(e) for e in graph]


def test_worker_modules_never_rebuild_the_metagraph() -> None:
    """Issue 10: a worker takes its MetaOps, pieces and buckets from the Plan; the code a worker runs (the executor and
    what it reads the plan with) never names build_metagraph (tests/unit/runtime/test_gradient_buckets.py builds
    workers with it disabled)."""
    for module in ("runtime.executor", "runtime.transfers", "runtime.gradsync", "runtime.payload", "runtime.assignment",
                   "runtime.steps", "runtime.zero", "runtime.channel"):
        tree = ast.parse((ROOT / (module.replace(".", "/") + ".py")).read_text())
        names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} | {
            n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)} | {
            a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
        assert "build_metagraph" not in names, module


# --------------------------------------------------------------------------- the CLI: plan and validate


CLI = """
import sys
from orchestrator.cli import app
try:
    app(args=sys.argv[1:], prog_name="loom")
except SystemExit as exc:
    code = exc.code
print("torch loaded:", "torch" in sys.modules, file=sys.stderr)
sys.exit(code)
"""


@pytest.mark.parametrize("args", [
    ["validate", "examples/quickstart-cpu.yaml"],
    ["validate", "recipes/medical/unimed-tiny.yaml"],
    ["plan", "examples/quickstart-cpu.yaml", "--no-baselines", "--output", "json"],
], ids=["validate", "validate-recipe", "plan"])
def test_plan_and_validate_never_import_torch(args: list[str]) -> None:
    result = subprocess.run([sys.executable, "-c", CLI, *args], cwd=ROOT, capture_output=True, text=True,
                            timeout=300, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip(), "the command printed nothing"
    assert result.stderr.strip().splitlines()[-1] == "torch loaded: False"
