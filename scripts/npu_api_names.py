"""The torch_npu Python API this project uses, each name checked in a torch_npu wheel.

Usage:
    python scripts/npu_api_names.py PATH [--write tests/data/torch_npu_api.txt]

PATH: a torch_npu wheel (.whl), an unpacked one (the folder holding torch_npu/), or the
torch_npu/ package folder itself. Nothing is imported: torch_npu needs CANN and an NPU to
import, so its Python files are read as text and parsed.

A name is a dotted path from the torch_npu package (`npu.Event.record`: `record` in the body
of class `Event` as torch_npu/npu reaches it), or `torch.X.Y` for what torch_npu installs on
torch at import (an assignment to `torch.X.Y` in one of its files). A module defines a name
when its top level (if / try blocks included) has a def, class or assignment of it, imports it
(`from .streams import Event`, `from .scheduler import Schedule as schedule`: followed into
that module; an import from outside the package, a C extension, counts as is), star-imports a
module that defines it, or has a submodule of that name. Why each name is used is kept beside
it (API below), so the list says what would break if torch_npu renamed it. Exit status 1 when
a name is missing; --write writes the list only when every name was found.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

# name -> where ssd-npu uses it (or why the fake torch_npu of tests/test_npu_seam.py offers it)
API: dict[str, str] = {
    "__version__": "import_torch_npu: the torch release it pairs with",
    "npu": "torch_npu.npu, which torch_npu registers as torch.npu",
    "npu.is_available": "resolve_device: an NPU is visible",
    "npu.set_device": "resolve_device: this rank's NPU",
    "npu.set_compile_mode": "resolve_device: device.jit_compile",
    "npu.is_bf16_supported": "resolve_device: amp's default dtype",
    "npu.get_amp_supported_dtype": "torch.autocast('npu') asks the device module",
    "npu.synchronize": "Device.synchronize: a clock read after queued work",
    "npu.Event": "Device.event: timing marks, the prefetcher's copy events",
    "npu.Event.record": "Mark, DevicePrefetcher: a point in a stream's queue",
    "npu.Event.synchronize": "Mark.wait: the host reads a step's results",
    "npu.Event.elapsed_time": "Mark.ms_since: a step's device time",
    "npu.Event.query": "an event's state without waiting (the fake offers it; unused)",
    "npu.Stream": "Device.stream: the prefetcher's copy stream",
    "npu.Stream.wait_event": "DevicePrefetcher: the step waits for its own batch's copy",
    "npu.Stream.wait_stream": "a whole-stream wait (the fake records it: the loop must not)",
    "npu.stream": "Device.on_stream: the copies are queued on the copy stream",
    "npu.current_stream": "Device.current_stream: the step's stream",
    "npu.get_rng_state": "Device.rng_state: checkpoints keep the NPU generator",
    "npu.set_rng_state": "Device.set_rng_state: resume restores it",
    "npu.manual_seed_all": "torch.manual_seed (seed_everything) seeds the NPU through it",
    "npu._is_in_bad_fork": "torch.manual_seed asks it before manual_seed_all",
    "npu.amp": "torch_npu.npu.amp",
    "npu.amp.GradScaler": "Device.grad_scaler: amp fp16 on npu",
    "profiler": "Device.profiler: torch_npu's profiler",
    "profiler.profile": "Device.profiler",
    "profiler.ProfilerActivity": "Device.profiler: CPU and NPU activities",
    "profiler.schedule": "Device.profiler: wait, warm-up, active steps",
    "profiler.tensorboard_trace_handler": "Device.profiler: traces for TensorBoard",
    "torch.compiler.npugraph_mark_step_begin": "Device.mark_step_begin: NPU graph trees",
}

HEADER = """\
# torch_npu's Python API as ssd-npu uses it, one name a line with where it is used: a dotted
# path from the torch_npu package, or torch.X for what torch_npu installs on torch at import.
# The fake torch_npu of tests/test_npu_seam.py offers only names on this list.
# Written by scripts/npu_api_names.py, which found every name in torch_npu {version}:
#   python scripts/npu_api_names.py torch_npu-{version}-...whl --write tests/data/torch_npu_api.txt
"""


class Sources:
    """The Python files of a torch_npu package, by path inside it ("npu/streams.py"), read
    from a wheel or a folder; nothing is imported."""

    def __init__(self, path: Path) -> None:
        self.files: dict[str, str] = dict(_read_wheel(path) if path.is_file() else _read_dir(path))
        if "__init__.py" not in self.files:
            raise SystemExit(f"{path}: no torch_npu/__init__.py inside")
        self._trees: dict[str, ast.Module] = {}

    def module_file(self, parts: tuple[str, ...]) -> str | None:
        """The file of module `parts` (a package's __init__.py, or a .py), None if none."""
        stem = "/".join(parts)
        for rel in (f"{stem}/__init__.py" if stem else "__init__.py", f"{stem}.py"):
            if rel in self.files:
                return rel
        return None

    def tree(self, rel: str) -> ast.Module:
        if rel not in self._trees:
            self._trees[rel] = ast.parse(self.files[rel], filename=rel)
        return self._trees[rel]

    @property
    def version(self) -> str:
        found = re.search(r"__version__\s*=\s*['\"]([^'\"]+)", self.files.get("version.py", ""))
        return found[1] if found else "(unknown version)"


def _read_wheel(path: Path) -> Iterator[tuple[str, str]]:
    with zipfile.ZipFile(path) as wheel:
        for name in wheel.namelist():
            if name.startswith("torch_npu/") and name.endswith(".py"):
                yield name[len("torch_npu/") :], wheel.read(name).decode("utf-8", "replace")


def _read_dir(path: Path) -> Iterator[tuple[str, str]]:
    root = path if (path / "__init__.py").is_file() else path / "torch_npu"
    for file in root.rglob("*.py"):
        yield file.relative_to(root).as_posix(), file.read_text(errors="replace")


def _top_level(body: list[ast.stmt]) -> Iterator[ast.stmt]:
    """The statements a module or class body runs, into if / try / with blocks (torch_npu
    guards many imports), not into functions."""
    for node in body:
        yield node
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            continue
        for field in ("body", "orelse", "finalbody"):
            yield from _top_level(getattr(node, field, []))
        for handler in getattr(node, "handlers", []):
            yield from _top_level(handler.body)


@dataclass(frozen=True)
class Scope:
    """Where a lookup continues: a module (`parts`), a class in it (`cls`), or a name that
    exists but cannot be followed further (a function, a value, an import from outside)."""

    where: str
    parts: tuple[str, ...] | None = None
    cls: ast.ClassDef | None = None


def _module_of(parts: tuple[str, ...], rel: str, node: ast.ImportFrom) -> tuple[str, ...] | None:
    """The package path an ImportFrom in file `rel` (module `parts`) names; None when it is
    outside torch_npu."""
    target = tuple((node.module or "").split(".")) if node.module else ()
    if node.level == 0:
        return target[1:] if target[:1] == ("torch_npu",) else None
    package = parts if rel.endswith("__init__.py") else parts[:-1]
    base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
    return base + target


def _in_module(src: Sources, parts: tuple[str, ...], name: str, seen: set) -> Scope | None:
    """`name` as module `parts` defines it (see the module docstring), or None."""
    if (parts, name) in seen:
        return None
    seen.add((parts, name))
    rel = src.module_file(parts)
    if rel is None:
        return None
    stars: list[tuple[str, ...]] = []
    for node in _top_level(src.tree(rel).body):
        found = _defines(src, parts, rel, node, name, seen, stars)
        if found is not None:
            return found
    for module in stars:
        found = _in_module(src, module, name, seen)
        if found is not None:
            return found
    if src.module_file((*parts, name)) is not None:
        return Scope(f"{src.module_file((*parts, name))}", parts=(*parts, name))
    return None


def _defines(
    src: Sources,
    parts: tuple[str, ...],
    rel: str,
    node: ast.stmt,
    name: str,
    seen: set,
    stars: list[tuple[str, ...]],
) -> Scope | None:
    """What `node`, a top-level statement of module `parts`, binds to `name` (or None);
    star-imports are collected in `stars`, to be searched after the module's own names."""
    if isinstance(node, ast.ClassDef) and node.name == name:
        return Scope(f"{rel}:{node.lineno} class {name}", parts=parts, cls=node)
    if _binds(node, name):
        return Scope(f"{rel}:{node.lineno}")
    if isinstance(node, ast.ImportFrom):
        module = _module_of(parts, rel, node)
        for alias in node.names:
            if alias.name == "*" and module is not None:
                stars.append(module)
            elif (alias.asname or alias.name) == name:
                if module is None:  # from outside torch_npu (torch, a C extension): as is
                    return Scope(f"{rel}:{node.lineno} from {node.module}")
                return _in_module(src, module, alias.name, seen) or (
                    Scope(f"{rel}:{node.lineno} from {node.module}")
                    if src.module_file(module) is None  # a C extension (torch_npu._C)
                    else None
                )
    return None


def _binds(node: ast.stmt, name: str) -> bool:
    """A def, an assignment or an `import x as name` of `name` (classes: see `_defines`)."""
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
        return node.name == name
    if isinstance(node, ast.Assign | ast.AnnAssign | ast.AugAssign):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        return any(isinstance(t, ast.Name) and t.id == name for t in targets)
    if isinstance(node, ast.Import):
        return any((a.asname or a.name.split(".")[0]) == name for a in node.names)
    return False


def _in_class(cls: ast.ClassDef, rel: str, name: str) -> Scope | None:
    for node in _top_level(cls.body):
        if isinstance(node, ast.ClassDef) and node.name == name:
            return Scope(f"{rel}:{node.lineno} class {cls.name}.{name}", cls=node)
        if _binds(node, name):
            return Scope(f"{rel}:{node.lineno} {cls.name}.{name}")
    return None


def _torch_attribute(src: Sources, name: str) -> Scope | None:
    """An assignment `torch.X.Y = ...` anywhere in the package (what it installs on torch)."""
    for rel, text in sorted(src.files.items()):
        if name not in text:
            continue
        for node in ast.walk(src.tree(rel)):
            if isinstance(node, ast.Assign) and any(ast.unparse(t) == name for t in node.targets):
                return Scope(f"{rel}:{node.lineno}")
    return None


def find(src: Sources, name: str) -> str | None:
    """Where torch_npu defines `name` ("file:line ..."), or None."""
    if name.startswith("torch."):
        found = _torch_attribute(src, name)
        return found.where if found else None
    scope: Scope | None = Scope("__init__.py", parts=())
    for part in name.split("."):
        if scope is None:
            return None
        if scope.cls is not None:
            rel = scope.where.split(":")[0]
            scope = _in_class(scope.cls, rel, part)
        elif scope.parts is not None:
            scope = _in_module(src, scope.parts, part, set())
        else:
            return None  # a function or value: nothing to look inside
    return scope.where if scope else None


def render(version: str) -> str:
    """The list file: the header, then `name  # why` per name, sorted."""
    width = max(map(len, API))
    rows = [f"{name:<{width}}  # {why}" for name, why in sorted(API.items())]
    return HEADER.format(version=version) + "\n".join(rows) + "\n"


def read_names(text: str) -> dict[str, str]:
    """{name: why} of a list file written by `render`."""
    names = {}
    for line in text.splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, why = line.partition("#")
            names[name.strip()] = why.strip()
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path, help="torch_npu wheel or unpacked folder")
    parser.add_argument("--write", type=Path, help="write the list here if every name exists")
    args = parser.parse_args(argv)
    src = Sources(args.path)
    missing = []
    for name in sorted(API):
        where = find(src, name)
        print(f"{name:<42} {where or 'MISSING'}")
        if where is None:
            missing.append(name)
    if missing:
        print(f"{len(missing)} name(s) not in torch_npu {src.version}: {', '.join(missing)}")
        return 1
    if args.write:
        args.write.parent.mkdir(parents=True, exist_ok=True)
        args.write.write_text(render(src.version))
        print(f"wrote {args.write} ({len(API)} names, torch_npu {src.version})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
