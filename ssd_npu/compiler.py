"""torch.compile as a stand-in for a shape-compiling device: one graph per input shape.

`compile_fn` wraps a step function with `torch.compile(dynamic=False)`, so every new input
shape compiles a new graph, as an Ascend NPU compiles operators online for every new shape.
`graphs_compiled` reads dynamo's own counter.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def graphs_compiled() -> int:
    """Graphs compiled by torch.compile in this process so far (dynamo's own counter)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def compile_fn(fn: Callable, backend: str) -> Callable:
    """`fn` compiled once per input shape (`dynamic=False`) with the device's backend."""
    return torch.compile(fn, dynamic=False, backend=backend)
