"""One place knows the device: ssd_npu/device/backend.py (and ascend.py, its torch_npu import).
Elsewhere in the package no code names an accelerator ("cuda", "npu"), reaches torch.cuda /
torch.npu / torch_npu / cuDNN's switches, or branches on a device's type: it asks the `Device`
(streams, events, generator, DDP ids, defaults). A new device type is then added there
(docs/architecture.md, "Add a device").
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers import REPO

PACKAGE = REPO / "ssd_npu"
ACCELERATORS = ("cuda", "npu")
BACKENDS = ("torch.cuda", "torch.npu", "torch.backends.cudnn", "torch_npu")
# A device name as data, not a branch: the config's allowed values and their messages.
NAMES_ALLOWED = {"device/backend.py", "device/ascend.py", "choices.py", "config.py"}
# A host-vs-device test (which side a copy lands on), not a choice of accelerator.
TYPE_TESTS_ALLOWED = {"device/backend.py", "device/ascend.py", "tools/op_recorder.py"}


def _names_accelerator(node: ast.AST) -> bool:
    """A string constant that is an accelerator's name ("cuda", "npu:0")."""
    return (
        isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and node.value.split(":")[0] in ACCELERATORS
    )


def _backend_use(node: ast.AST) -> str | None:
    """The backend module an outermost name or attribute chain reaches (`torch.cuda.x`,
    `import torch_npu`, `getattr(torch, ...)`), or None."""
    if isinstance(node, ast.Import | ast.ImportFrom):
        modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
        hit = [m for m in modules if m and m.split(".")[0] == "torch_npu"]
        return f"import {hit[0]}" if hit else None
    if isinstance(node, ast.Call) and ast.unparse(node.func) == "getattr" and node.args:
        return "getattr(torch, ...)" if ast.unparse(node.args[0]) == "torch" else None
    if isinstance(node, ast.Attribute | ast.Name):
        text = ast.unparse(node)
        return next((b for b in BACKENDS if text == b or text.startswith(b + ".")), None)
    return None


def _is_type(node: ast.AST) -> bool:
    return (isinstance(node, ast.Attribute) and node.attr == "type") or (
        isinstance(node, ast.Name) and node.id == "device_type"
    )


def _is_str(node: ast.AST) -> bool:
    if isinstance(node, ast.Tuple | ast.List | ast.Set):
        return bool(node.elts) and all(_is_str(e) for e in node.elts)
    return isinstance(node, ast.Constant) and isinstance(node.value, str)


def _type_test(node: ast.AST) -> bool:
    """A comparison of a device type (`x.type`, `device_type`) with string constants."""
    if not isinstance(node, ast.Compare):
        return False
    operands = [node.left, *node.comparators]
    return any(map(_is_type, operands)) and any(map(_is_str, operands))


def _outermost(tree: ast.AST) -> list[ast.AST]:
    """Every node, except the attribute chains and names inside a larger chain (so
    `torch.cuda.synchronize()` is reported once, not also as `torch.cuda` and `torch`)."""
    inner = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    return [n for n in ast.walk(tree) if id(n) not in inner]


def device_knowledge(path: Path, rel: str) -> list[str]:
    """What `path` (package path `rel`) knows of devices that only device/backend.py may: one line
    "rel:line: what" per finding."""
    found = []
    for node in _outermost(ast.parse(path.read_text())):
        line = getattr(node, "lineno", 0)
        if rel not in NAMES_ALLOWED and _names_accelerator(node):
            found.append(f"{rel}:{line}: names {node.value!r}")
        if rel not in NAMES_ALLOWED - {"choices.py", "config.py"} and (
            backend := _backend_use(node)
        ):
            found.append(f"{rel}:{line}: uses {backend}")
        if rel not in TYPE_TESTS_ALLOWED and _type_test(node):
            found.append(f"{rel}:{line}: tests the device type: {ast.unparse(node)}")
    return sorted(set(found))


def test_only_the_backend_knows_the_device():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 20
    found = [hit for p in files for hit in device_knowledge(p, p.relative_to(PACKAGE).as_posix())]
    assert found == [], "ask the Device (ssd_npu/device/backend.py) instead"


def test_the_check_catches_device_knowledge(tmp_path):
    cases = {
        'if device.type == "cuda":\n    pass\n': ["names 'cuda'", "tests the device type"],
        'x = "npu:0"\n': ["names 'npu:0'"],
        "torch.cuda.synchronize()\n": ["uses torch.cuda"],
        "s = torch.npu.Stream()\n": ["uses torch.npu"],
        "torch.backends.cudnn.benchmark = True\n": ["uses torch.backends.cudnn"],
        "import torch_npu\n": ["uses import torch_npu"],
        "m = getattr(torch, device.type)\n": ["uses getattr(torch, ...)"],
        'ok = device_type != "cpu"\n': ["tests the device type"],
        'ok = out.device.type in ("cpu", "meta")\n': ["tests the device type"],
        # allowed: a Device property, a word in a docstring or message, torch's own cpu calls
        "ok = device.is_accelerator\n": [],
        '"""Runs on cuda and npu."""\nmsg = f"device={name}: no cuda"\n': [],
        "torch.manual_seed(0)\nx = torch.device('cpu')\n": [],
    }
    for i, (source, needles) in enumerate(cases.items()):
        path = tmp_path / f"case_{i}.py"
        path.write_text(source)
        found = device_knowledge(path, "engine/loop.py")
        assert len(found) == len(needles), (source, found)
        for needle, hit in zip(needles, found, strict=True):
            assert needle in hit, (source, found)
    path.write_text('if device.type == "npu":\n    import torch_npu\n')
    assert device_knowledge(path, "device/backend.py") == []  # where it belongs
    path.write_text('DEVICES = ("auto", "cpu", "cuda", "npu")\n')
    assert device_knowledge(path, "choices.py") == []
