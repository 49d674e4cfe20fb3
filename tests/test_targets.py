"""pad_fields: every per-instance field (boxes, labels, area, iscrowd, masks) on M rows."""

import pytest
import torch

from ssd_npu.data.fixed_shape import pad_fields, pad_targets


def instance_fields(n: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """n instances whose fields all encode the instance index i, so rows can be checked."""
    i = torch.arange(n)
    masks = torch.zeros(n, 12, 10, dtype=torch.uint8)
    for k in range(n):
        masks[k, k % 12, k % 10] = 1 + k  # each mask marks its own instance
    return {
        "boxes": torch.stack([i, i, i + 1, i + 1], 1).float(),
        "labels": i + 1,
        "area": (i + 1).float() * 2,
        "iscrowd": (i % 2).to(torch.int64),
        "masks": masks,
    }


def test_pads_every_field_with_one_mask():
    fields = instance_fields(3, torch.Generator().manual_seed(0))
    padded, valid, dropped = pad_fields(fields, 5, torch.Generator().manual_seed(0))
    assert dropped == 0 and valid.tolist() == [True, True, True, False, False]
    assert padded["masks"].shape == (5, 12, 10) and padded["masks"].dtype == torch.uint8
    for name, value in fields.items():
        assert padded[name].shape[0] == 5 and padded[name].dtype == value.dtype
        torch.testing.assert_close(padded[name][:3], value)
        assert not padded[name][3:].any()  # padding rows are zeros


def test_subset_is_the_same_rows_of_every_field():
    fields = instance_fields(9, torch.Generator().manual_seed(0))
    padded, valid, dropped = pad_fields(fields, 4, torch.Generator().manual_seed(3))
    assert dropped == 5 and bool(valid.all())
    kept = padded["labels"] - 1  # the instance index of each row
    assert kept.tolist() == sorted(kept.tolist()) and len(set(kept.tolist())) == 4
    for name, value in fields.items():
        torch.testing.assert_close(padded[name], value[kept], msg=name)
    # each kept mask still marks its own instance
    for row, k in enumerate(kept.tolist()):
        assert int(padded["masks"][row].sum()) == 1 + k


def test_pad_targets_is_pad_fields_on_boxes_and_labels():
    fields = instance_fields(9, torch.Generator().manual_seed(0))
    boxes, labels, valid, dropped = pad_targets(
        fields["boxes"], fields["labels"], 4, torch.Generator().manual_seed(3)
    )
    padded, valid2, dropped2 = pad_fields(fields, 4, torch.Generator().manual_seed(3))
    torch.testing.assert_close(boxes, padded["boxes"])
    torch.testing.assert_close(labels, padded["labels"])
    assert torch.equal(valid, valid2) and dropped == dropped2
    empty = pad_targets(torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), 3, None)
    assert empty[0].shape == (3, 4) and not empty[2].any() and empty[3] == 0


def test_fields_must_agree_on_instances():
    with pytest.raises(ValueError, match="first dim"):
        pad_fields({"boxes": torch.zeros(2, 4), "labels": torch.zeros(3)}, 4, None)
