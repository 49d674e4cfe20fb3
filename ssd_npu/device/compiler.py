"""torch.compile as a stand-in for a shape-compiling device: one graph per input shape.

`CompiledStep` wraps a step function with `torch.compile(dynamic=False)`, so every new input
shape compiles a new graph, as an Ascend NPU compiles operators online for every new shape.
It counts the graphs each call compiled (dynamo's own
`unique_graphs` counter): graphs of the first call are the warm-up, every graph after it is
a recompile. With `fail_on_recompile`, calls after the first run under
`torch.compiler.set_stance("fail_on_recompile")` and a recompile raises `RecompileError`
with dynamo's guard-failure text, which names the tensor whose shape changed. `mode` is
torch.compile's own (inductor only): "reduce-overhead" replays the step as CUDA graphs on cuda
(NPU graphs on npu, through torch_npu's graph trees), possible because every shape of the
fixed step is fixed (inductor skips them for CPU graphs).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ssd_npu.device.backend import Device
from ssd_npu.errors import UserError

_CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")  # torch.compile modes with CUDA graphs
_DYNAMO_FAIL_PREFIX = "Detected recompile when torch.compile stance is 'fail_on_recompile'"


def _limit_keys() -> tuple[str, str]:
    """dynamo's config keys for the recompile limit and for failing at it: torch 2.7 renamed
    cache_size_limit / fail_on_cache_limit_hit, the only names torch 2.6 knows."""
    if hasattr(torch._dynamo.config, "recompile_limit"):
        return "recompile_limit", "fail_on_recompile_limit_hit"
    return "cache_size_limit", "fail_on_cache_limit_hit"


NO_REASON = "(this torch records no recompile reason: rerun with TORCH_LOGS=recompiles)"


def recompile_reasons(records: list) -> list[str]:
    """dynamo's guard-failure texts of compile records (`get_compilation_metrics()`); torch 2.6
    records have no `recompile_reason` field, so there they are unknown (empty)."""
    reasons = (getattr(m, "recompile_reason", None) for m in records)
    return [r for r in reasons if r]


@dataclass(frozen=True)
class CompileOptions:
    """`torch.compile(dynamic=False)` of the step: one graph per input shape, like an NPU."""

    backend: str = "inductor"  # "npu" on Ascend (torch_npu's dynamo backend)
    fail_on_recompile: bool = False  # a new graph after the first call raises RecompileError
    recompile_limit: int | None = None  # dynamo's per-function limit; None: torch's default
    fail_on_limit: bool = False  # past the limit: raise instead of running eagerly
    mode: str | None = None  # torch.compile's mode (inductor only); None: torch's default


class RecompileError(UserError):
    """A recompile after the first step under compiler.fail_on_recompile=true."""


def graphs_compiled() -> int:
    """Graphs compiled by torch.compile in this process so far (dynamo's own counter)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def graph_breaks() -> int:
    """Graph breaks dynamo took in this process so far (each splits a function into graphs)."""
    from torch._dynamo.utils import counters

    return int(sum(counters["graph_break"].values()))


def cudagraph_skips() -> int:
    """Times inductor declined to replay a graph as a CUDA graph (it logs "skipping cudagraphs
    due to ..." under TORCH_LOGS=perf_hints); 0 where no CUDA-graph mode ran."""
    from torch._dynamo.utils import counters

    return int(counters["inductor"]["cudagraph_skips"])


def reset() -> None:
    """Forget every compiled graph and zero dynamo's counters (between benchmark runs)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()


def device_of(args: tuple) -> Device:
    """The device of the first tensor in a call's arguments: where the graphs of that call
    replay, so whose graph trees a new iteration is marked in. cuda when there is no tensor
    (torch's own CUDA-graph call, as before devices were told apart here)."""
    tensors = (a for a in torch.utils._pytree.tree_leaves(args) if isinstance(a, torch.Tensor))
    first = next(tensors, None)
    return Device.of(None if first is None else first.device)


class CompiledStep:
    """`fn` under `torch.compile(dynamic=False)`, counting graphs compiled per call.

    `graphs_per_call[i]`: graphs compiled during call i (0-based). `recompiles_per_call[i]`:
    dynamo's own recompiles during call i (a function compiled again because a guard, mostly
    a tensor shape, failed; torchvision's per-image code recompiles within the first step
    already), with their reasons in `recompile_reasons`. `recompile_limit`: dynamo's
    per-function limit while this step runs (None: torch's default, 8); past it dynamo runs
    the function eagerly, or raises `FailOnRecompileLimitHit` with `fail_on_limit`. `mode`:
    torch.compile's mode (None: torch's default); with a CUDA-graph mode each call first marks
    a new iteration (`Device.mark_step_begin` of the inputs' device: torch's
    `cudagraph_mark_step_begin`, as torch advises for a training loop, or torch_npu's
    `npugraph_mark_step_begin`) and returns copies of the outputs, which the next replay would
    overwrite before the loop reads them (one step late).
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
        # process-wide counters when the step was made: the backward graph is compiled during
        # the loop's backward(), outside __call__, so these are read as totals since then
        self._breaks_base, self._skips_base = graph_breaks(), cudagraph_skips()

    @property
    def graphs(self) -> int:
        return sum(self.graphs_per_call)

    @property
    def recompiles(self) -> int:
        return sum(self.recompiles_per_call)

    @property
    def graph_breaks(self) -> int:
        """dynamo's graph breaks since this step was made (0: the step is whole graphs)."""
        return graph_breaks() - self._breaks_base

    @property
    def cudagraph_skips(self) -> int:
        """Graphs inductor ran without CUDA graphs since this step was made (CUDA-graph modes)."""
        return cudagraph_skips() - self._skips_base

    def statistics(self, reasons: int = 5) -> dict[str, Any]:
        """The compile statistics summary.json and bench.json report: graphs_compiled,
        recompiles, graphs_per_step and recompiles_per_step (per call), the first `reasons`
        recompile_reasons, graph_breaks and cudagraph_skips."""
        return {
            "graphs_compiled": self.graphs,
            "recompiles": self.recompiles,
            "graphs_per_step": list(self.graphs_per_call),
            "recompiles_per_step": list(self.recompiles_per_call),
            "recompile_reasons": self.recompile_reasons[:reasons],
            "graph_breaks": self.graph_breaks,
            "cudagraph_skips": self.cudagraph_skips,
        }

    @staticmethod
    def eager_statistics() -> dict[str, Any]:
        """`statistics` of a step that is not compiled: nothing compiled, nothing recompiled."""
        return {
            "graphs_compiled": None, "recompiles": 0, "graphs_per_step": None,
            "recompiles_per_step": None, "recompile_reasons": [], "graph_breaks": None,
            "cudagraph_skips": None,
        }  # fmt: skip

    def add_last_call_of(self, other: CompiledStep) -> None:
        """Count `other`'s latest call (graphs, recompiles and their reasons) into this step's
        latest call: `other` is another compiled function of the same training step, the
        compiled optimizer step (`ssd_npu.engine.optim.OptimizerStep`), which runs after this step's
        forward. Before this step's first call, they open it."""
        if not other.graphs_per_call:
            return
        if not self.graphs_per_call:
            self.graphs_per_call.append(0)
            self.recompiles_per_call.append(0)
        recompiles = other.recompiles_per_call[-1]
        self.graphs_per_call[-1] += other.graphs_per_call[-1]
        self.recompiles_per_call[-1] += recompiles
        self.recompile_reasons.extend(other.recompile_reasons[-recompiles:] if recompiles else [])

    def _options(self) -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        patch: dict[str, Any] = {}
        limit_key, fail_on_limit_key = _limit_keys()
        if self.recompile_limit is not None:
            patch[limit_key] = self.recompile_limit
        if self.fail_on_limit:
            patch[fail_on_limit_key] = True
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
            device_of(args).mark_step_begin()
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
            # torch < 2.10 gives no guard text: then point to the log that has it
            reason = text.removeprefix(_DYNAMO_FAIL_PREFIX).lstrip(". ") or NO_REASON
            raise RecompileError(
                f"compiler.fail_on_recompile=true: call {len(self.graphs_per_call) + 1} would "
                "compile a new graph (a shape changed since the first step; on an NPU this is an "
                "online operator compile). Dynamo's reason, naming the tensor:\n"
                f"{reason}\n"
                "Fix the input or loss shape (see scripts/audit_shapes.py), or set "
                "compiler.fail_on_recompile=false."
            ) from err
        finally:
            self.graphs_per_call.append(graphs_compiled() - before)
            new = [m for m in get_compilation_metrics() if id(m) not in seen]
            reasons = recompile_reasons(new)
            if new and len(self.graphs_per_call) > 1 and not hasattr(new[0], "recompile_reason"):
                # torch < 2.7 records no reason: a compile after the first call is a recompile
                reasons = [NO_REASON] * len(new)
            self.recompiles_per_call.append(len(reasons))
            self.recompile_reasons.extend(reasons)
