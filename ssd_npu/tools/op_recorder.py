"""Op recorder: every aten op a piece of code runs, with shapes and the line that called it.

`OpRecorder` is a `TorchDispatchMode`. For each op (while `phase` is set) it keeps the aten
name, the input and output shapes and the *site*: the first Python frame outside torch, the
stdlib and ssd_npu/tools/, shortened to start at the package dir
(`torchvision/models/detection/ssd.py:277`, `ssd_npu/loss/ssd.py:41`). Frames are walked with
`sys._getframe` and every decision is cached per code object / line, so recording a training
step costs little more than running it.

Backward ops run inside the autograd engine, where the Python stack says nothing useful (on
a GPU it is empty: the engine's own threads). A `TorchFunctionMode` tags each new autograd
node with the forward site that created it (`grad_fn.metadata["audit_site"]`), and backward
ops are recorded at that forward site with kind "bwd" and the node's name (e.g.
`IndexBackward0`) as the caller; a node created elsewhere gives site "<backward>". No anomaly
mode is needed.
"""

from __future__ import annotations

import os
import sys
import sysconfig
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

Shape = tuple[int, ...]
Signature = tuple[tuple[Shape, ...], tuple[Shape, ...]]  # (input shapes, output shapes)
Key = tuple[str, str, str]  # (kind "fwd"|"bwd", site, op)

# Ops whose output size (or Python result) depends on tensor values: the host must wait for
# the device. Boolean-mask indexing is detected from its arguments (see `sync_reason`).
SYNC_OPS = {
    "aten::_local_scalar_dense": ".item() / bool() / int() reads a value on the host",
    "aten::nonzero": "output size = number of non-zeros (torch.where(cond), nonzero)",
    "aten::masked_select": "output size = number of True",
    "aten::_unique": "output size = number of unique values",
    "aten::_unique2": "output size = number of unique values",
    "aten::unique_dim": "output size = number of unique values",
    "aten::unique_consecutive": "output size = number of unique values",
    "aten::bincount": "output size = max value + 1",
    "aten::equal": "returns a Python bool",
}
INDEX_OPS = ("aten::index", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_")
_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_TOOLS_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep  # the recorder's own callers
_STDLIB = sysconfig.get_paths()["stdlib"] + os.sep


def sync_reason(name: str, args: tuple, out: Any, kwargs: dict | None = None) -> str | None:
    """Why op `name` forces a device-to-host sync, or None.

    A non-blocking copy to the host (into pinned memory, read later) does not make the host
    wait, so it is not a sync; a blocking one is.
    """
    if name in SYNC_OPS:
        return SYNC_OPS[name]
    if name in INDEX_OPS and len(args) > 1:
        masks = [t for t in args[1] if t is not None and t.dtype in (torch.bool, torch.uint8)]
        if masks:
            return "boolean-mask indexing: output size = number of True"
    if name in ("aten::_to_copy", "aten::copy_") and isinstance(out, torch.Tensor):
        src = args[1] if name == "aten::copy_" else args[0]
        if name == "aten::copy_":
            non_blocking = bool(args[2]) if len(args) > 2 else False
        else:
            non_blocking = bool((kwargs or {}).get("non_blocking", False))
        # host vs device only (which side the copy lands on), not which accelerator: the one
        # device-type test outside ssd_npu/device/backend.py (tests/test_device_seam.py allows it)
        if out.device.type == "cpu" and src.device.type != "cpu" and not non_blocking:
            return "copy from the device to the host"
    return None


class SiteFinder:
    """Source locations, shortened to start at the package dir; cached per code object/line."""

    def __init__(self) -> None:
        self._skip: dict[Any, bool] = {}
        self._short: dict[str, str] = {}
        self._loc: dict[tuple[str, int], str] = {}

    def _skipped(self, code: Any) -> bool:
        skip = self._skip.get(code)
        if skip is None:
            name = code.co_filename
            stdlib = name.startswith(_STDLIB) and "site-packages" not in name
            skip = name.startswith((_TORCH_DIR, _TOOLS_DIR)) or stdlib or name[0] == "<"
            self._skip[code] = skip
        return skip

    def _shorten(self, filename: str) -> str:
        short = self._short.get(filename)
        if short is None:
            path = Path(filename)
            top = path.parent
            while (top / "__init__.py").exists():  # climb to the top package dir
                top = top.parent
            short = self._short[filename] = path.relative_to(top).as_posix()
        return short

    def location(self, filename: str, lineno: int) -> str:
        loc = self._loc.get((filename, lineno))
        if loc is None:
            loc = self._loc[(filename, lineno)] = f"{self._shorten(filename)}:{lineno}"
        return loc

    def find(self, frame: Any) -> tuple[str, str]:
        """(site, caller): the first frame outside torch and the next one in another file."""
        site, site_file = "<unknown>", None
        while frame is not None:
            code = frame.f_code
            if not self._skipped(code):
                if site_file is None:
                    site, site_file = self.location(code.co_filename, frame.f_lineno), code
                elif code.co_filename != site_file.co_filename:
                    return site, self.location(code.co_filename, frame.f_lineno)
            frame = frame.f_back
        return site, ""


class _NodeTagger(TorchFunctionMode):
    """Writes the forward site into `grad_fn.metadata` of the autograd nodes an op creates."""

    def __init__(self, sites: SiteFinder) -> None:
        super().__init__()
        self.sites = sites

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else (out,)
        nodes = [t.grad_fn for t in outs if isinstance(t, torch.Tensor) and t.grad_fn is not None]
        todo = [n for n in nodes if "audit_site" not in n.metadata]
        if todo:
            site, _ = self.sites.find(sys._getframe(1))
            while todo:  # also the intermediate nodes of composite ops (cross_entropy...)
                node = todo.pop()
                if node is not None and "audit_site" not in node.metadata:
                    node.metadata["audit_site"] = site
                    todo.extend(n for n, _ in node.next_functions)
        return out


class OpRecorder(TorchDispatchMode):
    """Records aten ops while `phase` is "step" or "logging"; `end_step` closes a step.

    After N steps: `steps[i][key]` lists the signatures of the calls of step i in order,
    `syncs[key]` the reason a key syncs, `callers[key]` where its site was called from,
    `logging[(site, op)]` the number of syncs made in the logging phase.
    """

    def __init__(self) -> None:
        super().__init__()
        self.sites = SiteFinder()
        self.tagger = _NodeTagger(self.sites)
        self.phase: str | None = None
        self.steps: list[dict[Key, list[Signature]]] = []
        self.syncs: dict[Key, str] = {}
        self.callers: dict[Key, set[str]] = defaultdict(set)
        self.logging: dict[tuple[str, str], int] = defaultdict(int)

    def start_step(self) -> None:
        self.tagger.__enter__()
        self.__enter__()
        self.phase = "step"
        self.steps.append(defaultdict(list))

    def end_step(self) -> None:
        if self.phase is not None:
            self.phase = None
            self.__exit__(None, None, None)
            self.tagger.__exit__(None, None, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.phase is not None:
            self._record(func._schema.name, args, kwargs or {}, out)
        return out

    def _record(self, name: str, args: tuple, kwargs: dict, out: Any) -> None:
        node = torch._C._current_autograd_node()
        if node is not None:
            kind, caller = "bwd", node.name()
            site = node.metadata.get("audit_site", "<backward>")
        else:
            kind = "fwd"
            site, caller = self.sites.find(sys._getframe(2))
        reason = sync_reason(name, args, out, kwargs)
        if self.phase == "logging":
            if reason:
                self.logging[(site, name)] += 1
            return
        key = (kind, site, name)
        shapes_in = _shapes((args, tuple(kwargs.values())))
        shapes_out = _shapes(out)
        self.steps[-1][key].append((shapes_in, shapes_out))
        if caller:
            self.callers[key].add(caller)
        if reason:
            self.syncs[key] = reason


def _shapes(obj: Any) -> tuple[Shape, ...]:
    """Shapes of the tensors in nested tuples/lists (aten args hold nothing deeper)."""
    if isinstance(obj, torch.Tensor):
        return (tuple(obj.shape),)
    if isinstance(obj, (tuple, list)):
        return tuple(s for item in obj for s in _shapes(item))
    return ()
