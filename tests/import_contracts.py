"""Two import-linter contract types of this project: no import cycles, and GPU settings changed only
where that is allowed.

``make lint`` runs ``lint-imports`` with the contracts in ``pyproject.toml``. The layers and the
modules allowed to import pynvml or APScheduler are import-linter's own contract types; these two
state what its built-in ones cannot:

- ``acyclic``: no cycle among the modules of the root packages, counting imports inside functions
  (a local import that dodges a cycle is still one) but not those made only for type checking.
- ``gpu_setters``: a GPU setting (power limit, locked clocks, and their resets) is changed only by
  the modules allowed to; a call is found in a module's syntax tree by the setter's name.
"""

from __future__ import annotations

import ast
import importlib.util
from collections.abc import Iterator
from pathlib import Path

from grimp import ImportGraph
from importlinter import Contract, ContractCheck, fields, output
from importlinter.domain.helpers import module_expressions_to_modules

#: The ``GpuBackend`` methods that change a GPU's settings.
SETTERS = frozenset({"set_power_limit", "reset_power_limit", "lock_sm_clocks", "reset_sm_clocks"})


def _through_actuators(call: ast.Call) -> bool:
    """Whether a setter call goes to an ``Actuators`` object (``self._actuators.x(...)``): the
    actuators' own methods share the setters' names."""
    receiver = call.func.value if isinstance(call.func, ast.Attribute) else None
    name = receiver.attr if isinstance(receiver, ast.Attribute) else getattr(receiver, "id", "")
    return str(name).lstrip("_") == "actuators"


def setter_calls(path: Path) -> Iterator[tuple[str, int]]:
    """``(enclosing function, line)`` of every call of a GPU setter in a Python file, other than
    calls on the actuators themselves."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    stack: list[tuple[ast.AST, str]] = [(tree, "<module>")]
    while stack:
        node, func = stack.pop()
        for child in ast.iter_child_nodes(node):
            name = func
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                name = child.name
            if (
                isinstance(child, ast.Call)
                and isinstance(child.func, ast.Attribute)
                and child.func.attr in SETTERS
                and not _through_actuators(child)
            ):
                yield name, child.lineno
            stack.append((child, name))


def _cycles(graph: ImportGraph, modules: set[str]) -> list[list[str]]:
    """Every strongly connected set of two or more modules (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    counter = 0
    for root in sorted(modules):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root) & modules)))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            module, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    imported = graph.find_modules_directly_imported_by(child) & modules
                    work.append((child, iter(sorted(imported))))
                elif child in on_stack:
                    low[module] = min(low[module], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[module])
            if low[module] == index[module]:
                members = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    members.append(member)
                    if member == module:
                        break
                if len(members) > 1:
                    found.append(sorted(members))
    return found


class AcyclicContract(Contract):
    """No import cycle among the modules of ``packages``."""

    type_name = "acyclic"

    packages = fields.ListField(subfield=fields.ModuleField())

    def check(self, graph: ImportGraph, verbose: bool) -> ContractCheck:
        modules = {
            m for package in self.packages  # type: ignore[attr-defined]
            for m in graph.find_descendants(package.name) | {package.name}
        }
        cycles = _cycles(graph, modules)
        return ContractCheck(kept=not cycles, metadata={"cycles": cycles})

    def render_broken_contract(self, check: ContractCheck) -> None:
        for cycle in check.metadata["cycles"]:
            output.print_error(f"import cycle among: {', '.join(cycle)}")
            output.new_line()


class GpuSettersContract(Contract):
    """GPU settings are changed only in ``allowed_modules`` (module expressions)."""

    type_name = "gpu_setters"

    packages = fields.ListField(subfield=fields.ModuleField())
    allowed_modules = fields.ListField(subfield=fields.ModuleExpressionField())

    def check(self, graph: ImportGraph, verbose: bool) -> ContractCheck:
        allowed = {
            m.name for m in module_expressions_to_modules(
                graph, self.allowed_modules  # type: ignore[attr-defined]
            )
        }
        offenders = []
        for package in self.packages:  # type: ignore[attr-defined]
            for module in sorted(graph.find_descendants(package.name) | {package.name}):
                if module in allowed:
                    continue
                spec = importlib.util.find_spec(module)
                if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
                    continue
                offenders += [
                    f"{module}:{line} (in {func})" for func, line in setter_calls(Path(spec.origin))
                ]
        return ContractCheck(kept=not offenders, metadata={"offenders": offenders})

    def render_broken_contract(self, check: ContractCheck) -> None:
        for offender in check.metadata["offenders"]:
            output.print_error(f"{offender}: GPU settings change only through the actuators")
            output.new_line()
