"""ssd-npu: fixed-shape ssdlite320 training for shape-compiling devices."""

import os

# torch >= 2.5 auto-imports an installed torch_npu during `import torch`, which fails on a
# host without CANN even for device=cpu. Importing ssd_npu before torch stops that;
# ssd_npu.device imports torch_npu itself when device=npu asks for it.
os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")
