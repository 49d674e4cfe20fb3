"""Detector families, one module each, registered by name (`ModelSpec.family` says which).

To add a family: a module here implementing `Family` (`ssd_npu/families/base.py`), its entry in
`FAMILIES`, its models in `ssd_npu/models/specs.py` and `configs/model/` (docs/models.md).
"""

from __future__ import annotations

from ssd_npu.families.base import Family, FixedLoss, Head, Reduce, Targets, identity
from ssd_npu.families.fcos import FCOS
from ssd_npu.families.retinanet import RETINANET
from ssd_npu.families.ssd import SSD
from ssd_npu.models.specs import EvalRecipe, ModelSpec, SGDRecipe

FAMILIES: dict[str, Family] = {family.name: family for family in (SSD, RETINANET, FCOS)}


def family_of(name: str) -> Family:
    """The family called `name`; an unknown name raises ValueError listing the valid ones."""
    if name not in FAMILIES:
        raise ValueError(
            f"detector family {name!r} is not registered; one of: {', '.join(FAMILIES)}."
        )
    return FAMILIES[name]


def eval_recipe_of(spec: ModelSpec) -> EvalRecipe:
    """The postprocess settings `spec`'s builder gives its detector: its own, or its family's."""
    return spec.eval_recipe or family_of(spec.family).eval_recipe


def train_recipe_of(spec: ModelSpec) -> str:
    """`spec`'s training augmentation recipe (ssd_npu.data.transforms): its own, or its
    family's."""
    return spec.recipe or family_of(spec.family).train_recipe


def sgd_recipe_of(spec: ModelSpec) -> SGDRecipe:
    """`spec`'s SGD recipe (lr at a global batch, weight decay): its own, or its family's."""
    return spec.sgd or family_of(spec.family).sgd_recipe


__all__ = [
    "eval_recipe_of",
    "sgd_recipe_of",
    "train_recipe_of",
    "FAMILIES",
    "Family",
    "FixedLoss",
    "Head",
    "Reduce",
    "Targets",
    "family_of",
    "identity",
]
