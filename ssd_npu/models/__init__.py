"""The detectors: the model table, the fixed-shape wrapper and its fixed-size postprocess.

`specs` is the table of supported models (`ModelSpec`, each naming its family); `detector`
builds torchvision's detector and wraps it as `FixedDetector`; `postprocess` decodes its
head in fixed shapes; `nms` is the fixed-size NMS that postprocess uses. What differs
between detector families lives in `ssd_npu.families`.
"""
