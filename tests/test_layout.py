"""The package's folders are its architecture: the map in docs/architecture.md and the README
is the code's, every module a page names exists, and imports point one way."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest
import torchvision

from tests.helpers import REPO

PACKAGE = REPO / "ssd_npu"
ARCHITECTURE = REPO / "docs" / "architecture.md"
# What each part of the package may import at run time (imports under TYPE_CHECKING are only
# types). The order of docs/architecture.md's map: nothing imports a part above it.
MAY_IMPORT: dict[str, set[str]] = {
    "errors": set(),
    "choices": set(),
    "device": {"errors"},
    "data": {"choices", "errors"},
    "loss": set(),
    "models": {"choices", "errors", "families", "loss"},
    "families": {"choices", "errors", "models", "loss"},
    "engine": {"choices", "errors", "device", "data", "models", "families", "loss"},
    "evaluation": {"choices", "errors", "device", "data", "models", "families", "engine"},
    "config": {"choices", "errors", "models"},
    "build": {
        *("choices", "errors", "config", "device", "data", "models", "families", "engine"),
        "evaluation",
    },
    "train": {"choices", "errors", "config", "device", "engine", "evaluation", "build"},
    "cli": {"errors", "config", "device", "train"},
    "__init__": {"data", "loss", "models", "tools"},  # the public API, imported on first use
}


def part_of(module: str) -> str:
    """`ssd_npu.engine.loop` -> "engine"; `ssd_npu.train` -> "train"; `ssd_npu` -> "__init__"."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def runtime_imports(path: Path) -> set[str]:
    """The ssd_npu modules `path` imports when it runs (not under `if TYPE_CHECKING:`)."""
    tree = ast.parse(path.read_text())
    typing_only = {
        id(node)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
        for node in ast.walk(block)
    }
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ssd_npu"):
            if node.module == "ssd_npu" or (PACKAGE / node.module[8:].replace(".", "/")).is_dir():
                # `from ssd_npu.device import distributed`: the submodules themselves
                found |= {f"{node.module}.{alias.name}" for alias in node.names}
            else:
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("ssd_npu")}
    return {m for m in found if importlib.util.find_spec(m) is not None}


def import_graph() -> dict[str, set[str]]:
    return {
        module_name(path): runtime_imports(path)
        for path in sorted(PACKAGE.rglob("*.py"))
        if "configs" not in path.parts
    }


def test_each_part_imports_only_the_parts_below_it():
    wrong = [
        f"{module} imports {imported}"
        for module, imports in import_graph().items()
        if part_of(module) != "tools"  # offline tools may use anything; nothing uses them
        for imported in sorted(imports)
        if part_of(imported) != part_of(module)
        and part_of(imported) not in MAY_IMPORT[part_of(module)]
    ]
    assert wrong == []


def test_no_two_modules_import_each_other_even_through_others():
    graph = import_graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[list[str]] = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for nxt in sorted(graph.get(module, ())):
            if nxt == module or nxt not in graph:
                continue
            if state.get(nxt) == 1:
                cycles.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[module] = 2

    for module in graph:
        if module not in state:
            visit(module, [module])
    # a package's __init__ imports its own modules: `ssd_npu.loss` -> `ssd_npu.loss.ssd` is not
    # a cycle unless the module imports the package back
    assert cycles == []


def test_the_check_sees_a_part_importing_upwards(tmp_path):
    wrong = tmp_path / "bad.py"
    wrong.write_text(
        "from typing import TYPE_CHECKING\nfrom ssd_npu.engine.loop import Hook\n"
        "from ssd_npu.device import distributed\n"
        "if TYPE_CHECKING:\n    from ssd_npu.build import Training\n"
    )
    assert runtime_imports(wrong) == {"ssd_npu.engine.loop", "ssd_npu.device.distributed"}
    assert "engine" not in MAY_IMPORT["data"] and "build" not in MAY_IMPORT["engine"]


def map_entries(text: str) -> set[str]:
    """The package paths in the map (the fenced block of "## Layout"): folders end in "/"."""
    block = text.split("## Layout: which module owns what\n", 1)[1].split("```\n", 2)[1]
    entries, stack = set(), []  # stack: (indent, folder)
    for line in block.splitlines():
        match = re.match(r"( *)(\S+)", line)
        if not match or not re.fullmatch(r"[\w.]+(\.py|/)", match[2]):
            continue  # a continuation line of a description
        indent, name = len(match[1]), match[2]
        if indent == 0 and line.startswith((" ", "\t")):
            continue
        stack = [(i, f) for i, f in stack if i < indent]
        path = "".join(f for _, f in stack) + name
        if name.endswith("/"):
            stack.append((indent, name))
        entries.add(path)
    return {e for e in entries if e.startswith(("ssd_npu/", "scripts/"))}


def test_the_architecture_map_lists_every_module_and_script_and_nothing_else():
    listed = map_entries(ARCHITECTURE.read_text())
    modules = {
        path.relative_to(REPO).as_posix()
        for path in PACKAGE.rglob("*.py")
        if path.name != "__init__.py" or path.parent == PACKAGE
    }
    folders = {
        path.parent.relative_to(REPO).as_posix() + "/" for path in PACKAGE.rglob("__init__.py")
    }
    assert {m for m in listed if m.startswith("ssd_npu/") and m.endswith(".py")} == modules
    scripts = {path.relative_to(REPO).as_posix() for path in (REPO / "scripts").glob("*.py")}
    assert {m for m in listed if m.startswith("scripts/") and m.endswith(".py")} == scripts
    assert {f for f in listed if f.startswith("ssd_npu/") and f.endswith("/")} == folders


def test_the_map_parser_reads_nesting():
    text = (
        "## Layout: which module owns what\n\n```\nssd_npu/     the package\n"
        "  a.py       one\n                more words\n  sub/       a folder\n"
        "    b.py     two\n  c.py       three\n```\n"
    )
    assert map_entries(text) == {
        "ssd_npu/",
        "ssd_npu/a.py",
        "ssd_npu/sub/",
        "ssd_npu/sub/b.py",
        "ssd_npu/c.py",
    }


def named_files(text: str) -> set[str]:
    """Every `something.py` a page names by path (`data/fit.py`, `scripts/bench.py`)."""
    return set(re.findall(r"(?<![\w/.-])((?:[\w-]+/)*[\w-]+\.py)\b", text))


TORCHVISION = Path(torchvision.__file__).parent
TORCHVISION_FILES = {path.name for path in TORCHVISION.rglob("*.py")}


def resolves(name: str) -> bool:
    """A path named on a page exists: from the repository, the package, scripts/ or tests/; or
    it is torchvision's (the pages cite its sources: `torchvision/ops/boxes.py`, `ssd.py`)."""
    ours = (REPO, PACKAGE, REPO / "scripts", REPO / "tests")
    if any((base / name).is_file() for base in ours):
        return True
    if name.startswith("torchvision/"):
        return (TORCHVISION.parent / name).is_file()
    return "/" not in name and name in TORCHVISION_FILES


def named_modules(text: str) -> set[str]:
    """Every dotted `ssd_npu.x.y` a page names."""
    return {m.rstrip(".") for m in re.findall(r"\bssd_npu(?:\.\w+)+", text)}


def exists(dotted: str) -> bool:
    """`ssd_npu.engine.loop.TrainLoop.finish` names a module, then attributes of it."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        name = ".".join(parts[:cut])
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:
            found = False
        if found:
            value = importlib.import_module(name)
            for attr in parts[cut:]:
                if not hasattr(value, attr):
                    if not isinstance(value, type):
                        return False
                    # a dataclass field or an attribute its __init__ sets is not on the class
                    init = getattr(value.__init__, "__code__", None)
                    fields = getattr(value, "__annotations__", {})
                    return attr in fields or (init is not None and attr in init.co_names)
                value = getattr(value, attr)
            return True
    return False


PAGES = sorted([REPO / "README.md", *(REPO / "docs").glob("*.md")])


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_module_a_page_names_exists(page):
    text = page.read_text()
    if page == ARCHITECTURE:  # its map names modules by folder; the test above checks it
        start = text.index("## Layout: which module owns what")
        text = text[:start] + text[text.index("## Seams", start) :]
    missing_files = sorted(n for n in named_files(text) if not resolves(n))
    missing_modules = sorted(m for m in named_modules(text) if not exists(m))
    assert missing_files == [] and missing_modules == [], page.name


def test_the_page_check_sees_an_old_name():
    assert not resolves("step.py") and not resolves("ssd_npu/model.py")
    assert resolves("torchvision/ops/boxes.py") and not resolves("torchvision/ops/nms.py")
    assert resolves("data/fit.py") and resolves("bench.py") and resolves("engine/loop.py")
    assert not exists("ssd_npu.engine.hooks.EvalHook") and exists(
        "ssd_npu.evaluation.hook.EvalHook"
    )
    assert exists("ssd_npu.loss.fixed_ssd_loss") and not exists("ssd_npu.postprocess")


def test_the_readme_map_names_every_folder():
    """The README's "Where the code is" names each folder of the package, and only those."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Where the code is\n", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"`ssd_npu/([\w]+)/`", section))
    folders = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert named == folders
