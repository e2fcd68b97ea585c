"""CONTRIBUTING.md cannot drift silently: every path it names exists, and every code identifier it names
(`module.name`, `Name`, `NAME`, `name()`) is defined in prefcli/ (or is a Makefile variable, or a name of the
standard library such as `sys.exit()`), every recipe field (`rlhf.kl_coef`) in a recipe schema. Read from the
source (ast), nothing imported but the schemas and the standard library."""

from __future__ import annotations

import ast
import importlib
import re
import sys
from functools import cache

from .conftest import ROOT

DOC = ROOT / "CONTRIBUTING.md"
IDENT = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_]\w*)*(\(\))?$")


@cache
def definitions() -> tuple[set[str], dict[str, set[str]]]:
    """(dotted module names under prefcli, {module or class name: the names defined in it}), where a module is
    known by every dotted suffix of its path (`names` for prefcli.recipe.commands.names)."""
    modules: set[str] = set()
    defined: dict[str, set[str]] = {}
    for p in [*(ROOT / "prefcli").rglob("*.py"), ROOT / "tests" / "conftest.py"]:
        parts = list(p.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names: set[str] = set()
        tree = ast.parse(p.read_text(encoding="utf-8"))
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
                if isinstance(node, ast.ClassDef):
                    members = {
                        n.name if not isinstance(n, ast.AnnAssign) else n.target.id
                        for n in node.body
                        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                        or (isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name))
                    }
                    defined.setdefault(node.name, set()).update(members)
            elif isinstance(node, ast.Assign):
                names.update(t.id for t in node.targets if isinstance(t, ast.Name))
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                names.add(node.target.id)
            elif isinstance(node, (ast.Import, ast.ImportFrom)) and parts[-1] != "prefcli":
                names.update((a.asname or a.name).split(".")[0] for a in node.names)
        for i in range(len(parts)):
            suffix = ".".join(parts[i:])
            modules.add(suffix)
            defined.setdefault(suffix, set()).update(names)
    return modules, defined


def is_code(ident: str) -> bool:
    """A name defined in prefcli/: bare (anywhere), or dotted from a module (any dotted suffix of its path) or a
    class down to the last name."""
    modules, defined = definitions()
    parts = ident.removesuffix("()").split(".")
    if len(parts) == 1:
        return any(parts[0] in names for names in defined.values()) or parts[0] in modules
    for cut in range(len(parts), 0, -1):  # the longest known scope (a module or a class), then names inside it
        scope = ".".join(parts[:cut])
        if scope not in defined and scope not in modules:
            continue
        for name in parts[cut:]:
            if name not in defined.get(scope, set()):
                break
            scope = name
        else:
            return True
    return False


def is_makefile_variable(ident: str) -> bool:
    return re.search(rf"^{re.escape(ident)} *[?:]?=", (ROOT / "Makefile").read_text(encoding="utf-8"), re.M) is not None


def is_stdlib(ident: str) -> bool:
    """`module.name` of the standard library (`sys.exit()`), the name looked up in the module."""
    module, _, rest = ident.removesuffix("()").partition(".")
    if module not in sys.stdlib_module_names or not rest:
        return False
    obj = importlib.import_module(module)
    for name in rest.split("."):
        if not hasattr(obj, name):
            return False
        obj = getattr(obj, name)
    return True


def is_recipe_field(ident: str) -> bool:
    from prefcli.recipe import SCHEMAS

    def walk(model, parts):
        if not parts:
            return True
        fields = getattr(model, "model_fields", {})
        if parts[0] not in fields:
            return False
        ann = fields[parts[0]].annotation
        nested = [a for a in getattr(ann, "__args__", (ann,)) if hasattr(a, "model_fields")]
        return len(parts) == 1 or any(walk(n, parts[1:]) for n in nested)

    return any(walk(schema, ident.split(".")) for schema in SCHEMAS.values())


def looks_like_code(ident: str) -> bool:
    """Dotted names, names with a capital or an underscore, calls: a bare lowercase word is a value (`sum`)."""
    return "." in ident or ident.endswith("()") or ident != ident.lower() or "_" in ident.strip("_")


def spans() -> list[str]:
    return re.findall(r"`([^`\n]+)`", DOC.read_text(encoding="utf-8"))


FILE = re.compile(r"^[\w./<>-]+\.(py|md|json|jsonl|yaml|toml|png|safetensors|txt)$")


def exists(path: str) -> bool:
    """In the repository (from its root, or under prefcli/), or a file or folder a run writes."""
    from prefcli.engine.runfolder import RUN_ARTIFACTS

    path = path.rstrip("/")
    if "<" in path:  # a pattern: its folder exists
        path = path[: path.index("<")].rsplit("/", 1)[0]
    return (ROOT / path).exists() or (ROOT / "prefcli" / path).exists() or path in RUN_ARTIFACTS


def test_every_path_contributing_names_exists():
    paths = [s for s in spans() if (("/" in s and " " not in s) or FILE.match(s)) and not s.startswith(("-", "$"))]
    assert len(paths) > 40, paths
    missing = [s for s in paths if not exists(s)]
    assert not missing, missing


def test_every_identifier_contributing_names_is_defined():
    idents = {s for s in spans() if IDENT.match(s) and looks_like_code(s) and not FILE.match(s)}
    assert len(idents) > 40, sorted(idents)
    unknown = sorted(
        s for s in idents if not (is_code(s) or is_recipe_field(s) or is_makefile_variable(s) or is_stdlib(s))
    )
    assert not unknown, unknown


def test_the_checks_can_fail():
    assert not is_code("runner.TASKS") and not is_code("names.NO_SUCH_NAME") and not is_code("NoSuchClass")
    assert is_code("names.ONLINE_OBJECTIVES") and is_code("engine.run.train") and is_code("Engine.run")
    assert is_recipe_field("rlhf.kl_coef") and not is_recipe_field("rlhf.clip_eps")
    assert is_makefile_variable("TORCH_INDEX") and not is_makefile_variable("NO_SUCH_VARIABLE")
    assert is_stdlib("sys.exit()") and not is_stdlib("sys.no_such_name") and not is_stdlib("runner.TASKS")
    assert exists("prefcli/engine/run.py") and exists("final/") and not exists("prefcli/runner/tasks.py")
