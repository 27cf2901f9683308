"""Conditioning as a tensor or a dict: the operations CFG, prompt dropout and caches rely on."""

import pytest
import torch

from acpo_lightning import conditioning as C


def _dict(batch: int, fill: float) -> dict:
    return {
        "encoder_hidden_states": torch.full((batch, 3, 2), fill, dtype=torch.bfloat16),
        "pooled": torch.full((batch, 4), fill),
        "ids": torch.arange(batch * 6, dtype=torch.long).view(batch, 6),
    }


def test_cat_stacks_every_entry_along_the_batch_in_order():
    uncond, cond = _dict(2, 0.0), _dict(2, 1.0)
    both = C.cat(uncond, cond)
    assert both["pooled"][:2].eq(0).all() and both["pooled"][2:].eq(1).all()
    assert both["ids"].shape == (4, 6) and C.batch_size(both) == 4
    tensor = C.cat(torch.zeros(1, 2), torch.ones(2, 2))
    assert tensor[:, 0].tolist() == [0.0, 1.0, 1.0]


def test_expand_repeats_one_sample_without_copying():
    null = _dict(1, 5.0)
    wide = C.expand(null, 3)
    assert C.describe(wide) == C.describe(null) and C.batch_size(wide) == 3
    assert wide["pooled"].data_ptr() == null["pooled"].data_ptr()  # a view


def test_where_replaces_the_masked_samples_and_keeps_entries_the_replacement_lacks():
    cond = _dict(3, 1.0)
    null = {k: v for k, v in _dict(1, 0.0).items() if k != "ids"}  # prompt parts only
    mask = torch.tensor([True, False, True])
    out = C.where(mask, null, cond)
    assert out["pooled"][:, 0].tolist() == [0.0, 1.0, 0.0]
    assert out["encoder_hidden_states"][:, 0, 0].float().tolist() == [0.0, 1.0, 0.0]
    assert out["encoder_hidden_states"].dtype == torch.bfloat16
    assert torch.equal(out["ids"], cond["ids"])  # micro-conditioning survives dropout
    flat = C.where(mask, torch.zeros(1, 2, 2), torch.ones(3, 2, 2))
    assert flat[:, 0, 0].tolist() == [0.0, 1.0, 0.0]


def test_first_gives_the_leading_entry_whose_dtype_the_samples_take():
    assert C.first(_dict(1, 0.0)).dtype == torch.bfloat16
    assert C.first(torch.zeros(1, dtype=torch.float16)).dtype == torch.float16


def test_to_casts_floating_entries_only_and_select_slices_the_batch():
    moved = C.to(_dict(4, 1.0), "cpu", torch.float16)
    assert moved["pooled"].dtype == torch.float16 and moved["ids"].dtype == torch.long
    part = C.select(moved, slice(1, 3))
    assert C.batch_size(part) == 2 and part["ids"][0, 0].item() == 6


@pytest.mark.parametrize("cond", [torch.zeros(2, 7, 5), _dict(2, 0.0)])
def test_describe_names_per_sample_shapes(cond):
    described = C.describe(cond)
    if isinstance(cond, torch.Tensor):
        assert described == {"encoder_hidden_states": (7, 5)}
    else:
        assert described == {"encoder_hidden_states": (3, 2), "pooled": (4,), "ids": (6,)}
