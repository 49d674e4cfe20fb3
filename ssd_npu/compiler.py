"""torch.compile as a stand-in for a shape-compiling device: one graph per input shape.

`CompiledStep` wraps a step function with `torch.compile(dynamic=False)`, so every new input
shape compiles a new graph, as an Ascend NPU compiles operators online for every new shape.
It counts the graphs each call compiled (dynamo's own
`unique_graphs` counter): graphs of the first call are the warm-up, every graph after it is
a recompile. With `fail_on_recompile`, calls after the first run under
`torch.compiler.set_stance("fail_on_recompile")` and a recompile raises `RecompileError`
with dynamo's guard-failure text, which names the tensor whose shape changed. `mode` is
torch.compile's own (inductor only): "reduce-overhead" replays the step as CUDA graphs on cuda,
possible because every shape of the fixed step is fixed (inductor skips them for CPU graphs).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch

from ssd_npu.errors import UserError

_CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")  # torch.compile modes with CUDA graphs
_DYNAMO_FAIL_PREFIX = "Detected recompile when torch.compile stance is 'fail_on_recompile'"


class RecompileError(UserError):
    """A recompile after the first step under compiler.fail_on_recompile=true."""


def graphs_compiled() -> int:
    """Graphs compiled by torch.compile in this process so far (dynamo's own counter)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def reset() -> None:
    """Forget every compiled graph and zero dynamo's counters (between benchmark runs)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()


class CompiledStep:
    """`fn` under `torch.compile(dynamic=False)`, counting graphs compiled per call.

    `graphs_per_call[i]`: graphs compiled during call i (0-based). `recompiles_per_call[i]`:
    dynamo's own recompiles during call i (a function compiled again because a guard, mostly
    a tensor shape, failed; torchvision's per-image code recompiles within the first step
    already), with their reasons in `recompile_reasons`. `recompile_limit`: dynamo's
    per-function limit while this step runs (None: torch's default, 8); past it dynamo runs
    the function eagerly, or raises `FailOnRecompileLimitHit` with `fail_on_limit`. `mode`:
    torch.compile's mode (None: torch's default); with a CUDA-graph mode each call first marks
    a new iteration (`torch.compiler.cudagraph_mark_step_begin`, as torch advises for a
    training loop) and returns copies of the outputs, which the next replay would overwrite
    before the loop reads them (one step late).
    """

    def __init__(
        self,
        fn: Callable,
        backend: str,
        fail_on_recompile: bool = False,
        recompile_limit: int | None = None,
        fail_on_limit: bool = False,
        mode: str | None = None,
    ):
        self.compiled = torch.compile(fn, dynamic=False, backend=backend, mode=mode)
        self.cudagraphs = mode in _CUDAGRAPH_MODES
        self.fail_on_recompile = fail_on_recompile
        self.recompile_limit = recompile_limit
        self.fail_on_limit = fail_on_limit
        self.graphs_per_call: list[int] = []
        self.recompiles_per_call: list[int] = []
        self.recompile_reasons: list[str] = []

    @property
    def graphs(self) -> int:
        return sum(self.graphs_per_call)

    @property
    def recompiles(self) -> int:
        return sum(self.recompiles_per_call)

    def _options(self) -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        patch: dict[str, Any] = {}
        if self.recompile_limit is not None:
            patch["recompile_limit"] = self.recompile_limit
        if self.fail_on_limit:
            patch["fail_on_recompile_limit_hit"] = True
        if patch:
            stack.enter_context(torch._dynamo.config.patch(**patch))
        if self.fail_on_recompile and self.graphs_per_call:
            stack.enter_context(torch.compiler.set_stance("fail_on_recompile"))
        return stack

    def __call__(self, *args: Any) -> Any:
        from torch._dynamo.utils import get_compilation_metrics

        before = graphs_compiled()
        # dynamo keeps its last 64 compile records; holding this list keeps their ids unique
        records = get_compilation_metrics()
        seen = {id(m) for m in records}
        if self.cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        try:
            with self._options():
                out = self.compiled(*args)
            if self.cudagraphs:
                # the loop reads step k's losses after it launched step k+1, whose replay
                # overwrites the graph's output buffers: keep copies (scalars, no host sync)
                out = torch.utils._pytree.tree_map_only(torch.Tensor, torch.clone, out)
            return out
        except RuntimeError as err:
            text = str(err)
            if not text.startswith(_DYNAMO_FAIL_PREFIX):
                raise
            raise RecompileError(
                f"compiler.fail_on_recompile=true: call {len(self.graphs_per_call) + 1} would "
                "compile a new graph (a shape changed since the first step; on an NPU this is an "
                "online operator compile). Dynamo's reason, naming the tensor:\n"
                f"{text.removeprefix(_DYNAMO_FAIL_PREFIX).lstrip('. ')}\n"
                "Fix the input or loss shape (see scripts/audit_shapes.py), or set "
                "compiler.fail_on_recompile=false."
            ) from err
        finally:
            self.graphs_per_call.append(graphs_compiled() - before)
            new = [m for m in get_compilation_metrics() if id(m) not in seen]
            reasons = [m.recompile_reason for m in new if m.recompile_reason]
            self.recompiles_per_call.append(len(reasons))
            self.recompile_reasons.extend(reasons)
