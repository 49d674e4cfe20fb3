"""The code runs on torch 2.6 to 2.14: where dynamo's names changed, the fallbacks pick the
name this torch has (checked against the installed torch; 2.6's names are in the docstrings)."""

from types import SimpleNamespace

import torch

from ssd_npu.device.compiler import _limit_keys, recompile_reasons


def test_dynamo_limit_keys_exist_in_this_torch():
    limit, fail_on_limit = _limit_keys()
    assert hasattr(torch._dynamo.config, limit)
    assert hasattr(torch._dynamo.config, fail_on_limit)
    with torch._dynamo.config.patch(**{limit: 3, fail_on_limit: True}):
        assert getattr(torch._dynamo.config, limit) == 3


def test_dynamo_limit_keys_fall_back_to_the_torch_2_6_names(monkeypatch):
    # torch 2.6's dynamo config has cache_size_limit / fail_on_cache_limit_hit only
    monkeypatch.delattr(torch._dynamo.config, "recompile_limit", raising=False)
    assert _limit_keys() == ("cache_size_limit", "fail_on_cache_limit_hit")


def test_recompile_reasons_of_records_without_the_field():
    # torch 2.6's CompilationMetrics has no recompile_reason field
    records = [SimpleNamespace(), SimpleNamespace(recompile_reason=None),
               SimpleNamespace(recompile_reason="tensor 'x' size mismatch at index 0")]  # fmt: skip
    assert recompile_reasons(records) == ["tensor 'x' size mismatch at index 0"]
