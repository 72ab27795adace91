"""kdcli's layout: no import cycles anywhere in kdcli, every module of one job under the size
limit, and the rules defined once (JSON sniffing, the command a recipe is for)."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import kdcli
from kdcli.recipe import find_producers, parse_temperature_scheduler
from kdcli.recipe.discover import expand_paths, sniff_json
from kdcli.recipe.validation import kind_of

PACKAGE = Path(kdcli.__file__).parent
#: the most lines a module of the recipe/check side may have
MODULE_LINES_MAX = 450


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """kdcli module -> the kdcli modules it imports (at any depth of its code, lazily too)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            edges |= {t for t in targets if t in modules and t != name}
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles of `graph` (a package's `__init__` importing its own submodules, and a
    submodule importing its package, do not count: Python resolves those)."""

    def counts(a: str, b: str) -> bool:
        return not (b.startswith(a + ".") or a.startswith(b + "."))

    found, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if not counts(node, nxt):
                continue
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_kdcli_has_no_import_cycles() -> None:
    """Lazy imports inside functions count too (a cycle hidden in a function is still one)."""
    assert cycles(import_graph()) == []


def test_the_registry_imports_no_scheduler_or_recipe_module() -> None:
    assert not {m for m in import_graph()["kdcli.registry"] if m.startswith(("kdcli.schedules", "kdcli.recipe"))}


def test_every_module_is_small() -> None:
    for path in PACKAGE.rglob("*.py"):
        lines = len(path.read_text(encoding="utf-8").splitlines())
        assert lines <= MODULE_LINES_MAX, f"{path.relative_to(PACKAGE)}: {lines} lines"


def test_sniff_json_reads_recipes_as_read_recipe_does(tmp_path: Path) -> None:
    """A byte-order mark is read as read_recipe reads it (UTF-8-sig) when looking at siblings."""
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + json.dumps({"student": {"model": "x"}}).encode())
    (tmp_path / "broken.json").write_text("{", encoding="utf-8")
    (tmp_path / "latin.json").write_bytes(b'{"a": "\xe9"}')
    assert sniff_json(tmp_path / "bom.json") == ("ok", {"student": {"model": "x"}})
    assert sniff_json(tmp_path / "broken.json").status == "broken"
    assert sniff_json(tmp_path / "latin.json").status == "unread"
    assert sniff_json(tmp_path / "missing.json").status == "unread"
    assert sniff_json(tmp_path).status == "irregular"


def test_a_recipe_saved_with_a_byte_order_mark_produces_its_output_folder(tmp_path: Path) -> None:
    """Bug fixed: find_producers read siblings as plain UTF-8, so a recipe saved with a BOM
    (which read_recipe accepts) produced nothing."""
    recipe = {"student": {"model": "x"}, "data": {"train": "t.tsv"}, "training": {"output_dir": "out/model"}}
    path = tmp_path / "teacher.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(recipe).encode())
    assert find_producers([path]) == {str(tmp_path / "out" / "model"): [path]}
    assert expand_paths([tmp_path]) == [path]


def test_kind_of_is_the_one_distill_or_train_rule() -> None:
    assert kind_of({"distillation": {}}) == "distill"
    assert kind_of({"distillation": None, "teacher": {}}) == "train"
    assert kind_of({}) == "train"
    assert kind_of([1]) is None


def test_temperature_scheduler_parsed_once_for_both_sides() -> None:
    """kdcli.schedules builds its scheduler from the recipe side's parser."""
    from kdcli import schedules

    assert schedules.parse_temperature_scheduler is parse_temperature_scheduler
    assert parse_temperature_scheduler("constant") == ["constant"]
    assert parse_temperature_scheduler(["flsw", {"gamma": 2, "beta": 1}]) == ["flsw", 1, 2]


def test_one_csv_dialect_for_the_run_and_the_check() -> None:
    import csv

    from kdcli.facts.tabular import dialect

    assert dialect("tsv") == dialect("tsv", "\t") == ("\t", csv.QUOTE_NONE)
    assert dialect("csv") == (",", csv.QUOTE_MINIMAL) and dialect("csv", ";") == (";", csv.QUOTE_MINIMAL)


def test_the_quickstarts_live_in_the_demo_package() -> None:
    """`make demo` runs `python -m kdcli.demo` (demo/__main__.py -> sst2.main), `make demo-lm`
    runs `python -m kdcli.demo.lm`; no demo module is left at the package's top."""
    from kdcli.demo import __main__ as demo_main
    from kdcli.demo import lm, sst2

    assert demo_main.main is sst2.main and callable(lm.main)
    assert not [p.name for p in PACKAGE.glob("*.py") if p.stem.startswith(("demo", "curves"))]
    makefile = (PACKAGE.parent / "Makefile").read_text(encoding="utf-8")
    assert "-m kdcli.demo\n" in makefile and "-m kdcli.demo.lm\n" in makefile
    assert sst2.RECIPES == lm.RECIPES == PACKAGE.parent / "recipes"


def _trees():
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path.relative_to(PACKAGE).as_posix(), ast.parse(path.read_text(encoding="utf-8"))


def _has_literal(node: ast.AST) -> bool:
    return any(isinstance(n, ast.Constant) and isinstance(n.value, int) for n in ast.walk(node))


def test_the_chunk_size_default_and_the_ignore_index_live_in_tasks() -> None:
    """256 (tokens per chunk) and -100 (no target) are written once, in kdcli/tasks/__init__.py;
    every other module names CHUNK_SIZE / IGNORE_INDEX."""
    found = []
    for where, tree in _trees():
        if where == "tasks/__init__.py":
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
                if isinstance(node.operand, ast.Constant) and node.operand.value == 100:
                    found.append(f"{where}:{node.lineno} -100")
            if isinstance(node, ast.arguments):
                named = node.posonlyargs + node.args
                pairs = list(zip(named[len(named) - len(node.defaults) :], node.defaults))
                pairs += [(a, d) for a, d in zip(node.kwonlyargs, node.kw_defaults) if d is not None]
                found += [f"{where}:{a.lineno} default" for a, d in pairs if "chunk" in a.arg and _has_literal(d)]
            if isinstance(node, ast.keyword) and node.arg and "chunk" in node.arg and _has_literal(node.value):
                found.append(f"{where}:{node.lineno} {node.arg}=")
            if isinstance(node, ast.Dict):
                for key, value in zip(node.keys, node.values):
                    if isinstance(key, ast.Constant) and "chunk" in str(key.value) and _has_literal(value):
                        found.append(f"{where}:{node.lineno} {key.value!r}:")
    assert found == []


def test_the_step_bound_and_the_proj_rule_are_written_once() -> None:
    """`max_steps < 1` only in recipe.schema.check_max_steps; a proj's dim_S / dim_T compared
    with a model's hidden size only in recipe.model_rules.proj_size_findings (the run calls it)."""
    found = []
    for where, tree in _trees():
        for node in ast.walk(tree):
            if not isinstance(node, ast.Compare):
                continue
            names = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
            attrs = {n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)}
            if "max_steps" in names and _has_literal(node) and where != "recipe/schema.py":
                found.append(f"{where}:{node.lineno} max_steps")
            if attrs & {"dim_S", "dim_T"} and where != "recipe/model_rules.py":
                found.append(f"{where}:{node.lineno} proj dims")
    assert found == []


#: the most lines a function (its signature, docstring and body) may have
FUNCTION_LINES_MAX = 120


def test_every_function_is_short() -> None:
    long = [
        f"{where}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for where, tree in _trees()
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > FUNCTION_LINES_MAX
    ]
    assert long == []


def test_no_module_imports_another_modules_private_names() -> None:
    """A `_name` is its module's own: what another module needs is public (`from kdcli.x import _y`
    was how models/loading reached into models/common)."""
    found = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("kdcli"):
                found += [
                    f"{path.relative_to(PACKAGE)}: {node.module}.{a.name}" for a in node.names if _private(a.name)
                ]
    assert found == []


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def test_the_task_owns_what_differs_between_tasks() -> None:
    """The engine, features, objective and losses never ask which task they serve: no module
    outside tasks/ (and the LM quickstart in demo/) imports kdcli.tasks.causal_lm, no
    `token_level` flag exists outside tasks/ and recipe/ (the checker's own wording), and no
    capture is built with `final_hidden=` outside demo/ (the run passes `Task.readout`)."""
    graph = import_graph()
    importers = sorted(m for m, edges in graph.items() if "kdcli.tasks.causal_lm" in edges)
    assert [m for m in importers if not m.startswith(("kdcli.tasks", "kdcli.demo"))] == []
    found = []
    for where, tree in _trees():
        if where.startswith(("tasks/", "recipe/", "demo/")):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr == "token_level":
                found.append(f"{where}:{node.lineno} .token_level")
            if isinstance(node, ast.Name) and node.id == "token_level":
                found.append(f"{where}:{node.lineno} token_level")
            if isinstance(node, ast.keyword) and node.arg == "final_hidden" and where != "features.py":
                found.append(f"{where}:{node.lineno} final_hidden=")
    assert found == []


#: comparisons with a task's name the engine keeps, each with its reason
ENGINE_TASK_NAME_CHECKS = {
    # model loading, by the task's name before a Task is built: a student built for causal-lm
    # generates as its teacher does (the teacher's generation_config copied)
    "engine/recipe_models.py",
}


def _names_the_task(node: ast.AST) -> bool:
    """`recipe.task` / `task` / `.evaluation`, or a task name written out ("causal-lm", ...)."""
    from kdcli.tasks import TASKS

    if isinstance(node, ast.Attribute):
        return node.attr in ("task", "evaluation")
    if isinstance(node, ast.Name):
        return node.id == "task"
    return isinstance(node, ast.Constant) and node.value in TASKS


def test_the_engine_never_asks_which_task_it_serves() -> None:
    """No `recipe.task == "causal-lm"` (or any comparison with a task or its name) in
    kdcli/engine/ beyond `ENGINE_TASK_NAME_CHECKS`: the task supplies what differs (its KD term,
    eval forwards, cache rows). The on-disk teacher cache keeps no `causal` switch: its rows are
    the task's `cache_rows`."""
    found: set[str] = set()
    allowed: set[str] = set()
    for where, tree in _trees():
        if not where.startswith("engine/"):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare) and any(_names_the_task(n) for n in [node.left, *node.comparators]):
                (allowed if where in ENGINE_TASK_NAME_CHECKS else found).add(f"{where}:{node.lineno}")
            if where == "engine/teacher_cache.py" and (
                (isinstance(node, ast.Attribute) and node.attr == "causal")
                or (isinstance(node, ast.Name) and node.id == "causal")
                or (isinstance(node, ast.arg) and node.arg == "causal")
                or (isinstance(node, ast.keyword) and node.arg == "causal")
            ):
                found.add(f"{where}:{node.lineno} causal")
    assert sorted(found) == []
    assert {w.split(":")[0] for w in allowed} == ENGINE_TASK_NAME_CHECKS  # each exception still needed


def test_one_table_of_divergence_names() -> None:
    """The registry maps a KD loss name to its functions (`fn`, `token_fn`); no other module
    keeps a name -> divergence table (the old `losses.divergences.DIVERGENCES`)."""
    from kdcli import registry
    from kdcli.losses import divergences

    assert not hasattr(divergences, "DIVERGENCES")
    for name in registry.loss_names("kd"):
        assert callable(registry.get_loss(name).token_fn()), name
    found = []
    for where, tree in _trees():
        for node in ast.walk(tree):
            if isinstance(node, ast.Dict) and where != "registry.py":
                keys = {k.value for k in node.keys if isinstance(k, ast.Constant)}
                if {"forward_kl", "reverse_kl"} <= keys:
                    found.append(f"{where}:{node.lineno}")
    assert found == []


def test_each_run_state_field_has_one_writer() -> None:
    """`RunState`: the fields the loop advances are written (`run.<field> = ...`, `+=`) in one
    module each, the one `engine.setup.ADVANCED_BY` names; every other field is built once in
    `setup()` and never assigned afterwards."""
    import dataclasses

    from kdcli.engine.setup import ADVANCED_BY, RunState

    fields = {f.name for f in dataclasses.fields(RunState)}
    assert set(ADVANCED_BY) <= fields
    writers: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        module = _module_name(path).removeprefix("kdcli.")
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = node.targets if isinstance(node, ast.Assign) else []
            if isinstance(node, (ast.AugAssign, ast.AnnAssign)):
                targets = [node.target]
            for t in targets:
                if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id in ("run", "state"):
                    if t.attr in fields:
                        writers.setdefault(t.attr, set()).add(module)
    assert writers == {name: {module} for name, module in ADVANCED_BY.items()}
