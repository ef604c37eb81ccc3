"""The fused two-pass step's op budget (issue 19) and its accelerator code path against the references.

On an accelerator every aten op is at least one kernel launch, so `first_step` + `second_step` must cost O(parameter
tensors + shapes) ops, not O(ops x tensors). Counted here on CPU tensors on the accelerator code path (ZSharp's
batched `topk` selection, `selection.row_by_row` off), with `torch.optim.AdamW(fused=True)` as the base.
"""

from __future__ import annotations

import pytest
import reference as ref
import torch
from benchmarking import OpCount, accelerator_code_path, timm_params
from reference import BUILDERS, model_with_grads
from test_optim_reference import assert_moved_by, grads_of

from hf_zsharp import ASAM, SAM, FriendlySAM, ZSharp
from hf_zsharp.optim import selection

# Ops per parameter tensor of one two-pass step (issue 19); ASAM and Friendly-SAM share SAM's moves.
BUDGET = {SAM: 1.2, ASAM: 1.2, FriendlySAM: 1.2, ZSharp: 2.5}


@pytest.fixture
def accelerator_path():
    with accelerator_code_path():
        yield


@pytest.fixture(scope="module", params=["vit_base_patch16_224", "resnet50"])
def timm_set(request):
    return request.param, timm_params(request.param)


@pytest.mark.parametrize("cls", list(BUDGET), ids=lambda c: c.__name__)
def test_two_pass_step_op_budget(timm_set, cls, accelerator_path) -> None:
    name, params = timm_set
    optimizer = cls(params, torch.optim.AdamW, lr=1e-6, fused=True)
    for _ in range(
        2 if cls is FriendlySAM else 1
    ):  # the base optimizer's state (and Friendly-SAM's momentum)
        optimizer.first_step()
        optimizer.second_step()
    with OpCount() as count:
        assert optimizer.first_step() is True
        optimizer.second_step()
    per_tensor = count.total / len(params)
    assert per_tensor <= BUDGET[cls], f"{name}: {count.total} ops for {len(params)} tensors: {count.ops}"
    if (
        cls is ZSharp
    ):  # the sparse moves: one take (save) and one put_ (move) per filtered tensor, one put_ (restore)
        filtered = sum(p.ndim > 1 for p in params)
        assert count.ops["put_"] == 2 * filtered and count.ops["take"] == filtered + 1


@pytest.mark.parametrize("zeros", [False, True], ids=["dense", "zeros"])
@pytest.mark.parametrize("name", sorted(BUILDERS))
@pytest.mark.parametrize("radius", ["tensor", "global"])
def test_accelerator_path_matches_reference(name: str, zeros: bool, radius: str, accelerator_path) -> None:
    model = model_with_grads(name, zeros=zeros)
    params, grads = grads_of(model)
    expected = ref.zsharp_ascent(grads, radius=radius)
    before = [p.detach().clone() for p in params]
    optimizer = ZSharp(model.parameters(), torch.optim.SGD, radius=radius, lr=0.1)
    assert optimizer.first_step() is True
    assert_moved_by(list(params), before, expected)
    masks = [ref.zscore_mask(g, 0.95) if g.ndim > 1 else None for g in grads]
    moved = sum(
        g.numel() if m is None or not m.any() else int(m.sum()) for g, m in zip(grads, masks, strict=True)
    )
    assert optimizer.ascent_stats["kept_fraction"] == pytest.approx(moved / sum(g.numel() for g in grads))
    optimizer.restore()
    assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("mask", ["zscore", "magnitude"])
def test_accelerator_path_low_precision_masks(dtype: torch.dtype, mask: str, accelerator_path) -> None:
    """Kept entries exactly as the reference's; the restore bit-exact (with -0.0 weights that a +0 would flip)."""
    model = model_with_grads("vit", dtype=dtype, zeros=True)
    params, grads = grads_of(model)
    with torch.no_grad():
        for p in params:
            p.zero_().neg_()
    expected = ref.zsharp_ascent(grads, mask=mask)
    before = [p.detach().clone() for p in params]
    optimizer = ZSharp(model.parameters(), torch.optim.SGD, mask=mask, lr=0.1)
    assert optimizer.first_step() is True
    for p, e in zip(params, expected, strict=True):
        assert torch.equal(p != 0, e.to(dtype) != 0)
    optimizer.restore()
    for p, b in zip(params, before, strict=True):
        assert torch.equal(p.view(torch.int16), b.view(torch.int16))


def test_random_mask_draws_the_same_on_both_paths(monkeypatch) -> None:
    """One tensor per shape: the accelerator path draws the same masks as the CPU path from the same seed."""
    moved = []
    for row_by_row in (True, False):
        monkeypatch.setattr(selection, "row_by_row", lambda device, r=row_by_row: r)
        model = model_with_grads("cnn")
        before = [p.detach().clone() for p in model.parameters()]
        ZSharp(model.parameters(), torch.optim.SGD, mask="random", lr=0.1).first_step()
        moved.append([p.detach() != b for p, b in zip(model.parameters(), before)])
    for a, b in zip(*moved, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("row_by_row", [True, False], ids=["cpu-path", "accelerator-path"])
def test_deterministic_algorithms_mode_runs_and_restores_exactly(monkeypatch, row_by_row: bool) -> None:
    """Under `torch.use_deterministic_algorithms(True)` (the Trainer's `full_determinism`) torch refuses `put_`:
    both paths move and restore through ops it accepts, and the restore is still bit-exact."""
    monkeypatch.setattr(selection, "row_by_row", lambda device: row_by_row)
    model = model_with_grads("cnn")
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = ZSharp(model.parameters(), torch.optim.SGD, lr=0.1)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        optimizer.first_step()
        assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))
        optimizer.restore()
    finally:
        torch.use_deterministic_algorithms(previous)
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, b)
