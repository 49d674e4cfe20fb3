"""COCO evaluation in fixed shapes: forward, records, COCOeval, pictures, and its hook.

`evaluate` runs the detector over the validation loader (`Evaluator`); `records` turns
detections into COCO result rows in bulk; `cocoeval` scores them (faster-coco-eval or
pycocotools); `background` scores in a side process; `detections` draws the picture sheet;
`hook` is the loop's `EvalHook`.
"""
