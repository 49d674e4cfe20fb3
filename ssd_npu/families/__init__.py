"""Detector families, one module each, registered by name (`ModelSpec.family` says which).

To add a family: a module here implementing `Family` (`ssd_npu/families/base.py`), its entry in
`FAMILIES`, its models in `ssd_npu/model_specs.py` and `configs/model/` (docs/models.md).
"""

from __future__ import annotations

from ssd_npu.families.base import Family, FixedLoss, Head, Reduce, Targets, identity
from ssd_npu.families.fcos import FCOS
from ssd_npu.families.retinanet import RETINANET
from ssd_npu.families.ssd import SSD

FAMILIES: dict[str, Family] = {family.name: family for family in (SSD, RETINANET, FCOS)}


def family_of(name: str) -> Family:
    """The family called `name`; an unknown name raises ValueError listing the valid ones."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(
            f"detector family {name!r} is not registered; one of: {', '.join(FAMILIES)}."
        ) from None


__all__ = ["FAMILIES", "Family", "FixedLoss", "Head", "Reduce", "Targets", "family_of", "identity"]
