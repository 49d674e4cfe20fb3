"""The training loop and its hooks, taking built objects (never the config).

`loop` is the loop itself (`TrainLoop`, `Hook`); `train_step` the per-batch step it calls
(fixed or dynamic shapes); `optim` the optimizer and schedule; `hooks` the hooks every run
has (checkpoint, stop signal, profiler, bucket counts); `checkpoint`, `ema`, `interrupt`
and `telemetry` what those hooks use. Evaluation's hook lives in `ssd_npu.evaluation`.
"""
