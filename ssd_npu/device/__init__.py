"""Where the step runs: the device seam and what hangs off it.

`backend` parses `device=` and imports and checks the backend (the only module that names
cuda or npu); `distributed` is the process group; `compiler` wraps the step in
`torch.compile` with the backend's compiler; `prefetch` copies batches to the device ahead
of the step. Nothing here imports the loop, the models or the data.
"""
