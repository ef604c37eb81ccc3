"""ZSharp's ascent against the independent reference in tests/reference.py (the paper's step, float64)."""

from __future__ import annotations

import pytest
import reference as ref
import torch
from reference import BUILDERS, model_with_grads
from torch import nn

from hf_zsharp import SAM, ZSharp


def grads_of(model: nn.Module) -> tuple[list[nn.Parameter], list[torch.Tensor]]:
    params = [p for p in model.parameters() if p.grad is not None]
    return params, [p.grad.detach().clone() for p in params]


def assert_moved_by(
    after: list[torch.Tensor], before: list[torch.Tensor], expected: list[torch.Tensor]
) -> None:
    """w_after == round(w + e) up to one ulp of the weights plus fp32 error in e.

    The optimizer works in fp32 on fp32 or lower-precision tensors: its e carries relative error ~1e-6
    (sums over <= 1e6 entries), then w + e is rounded to the parameter dtype (<= 1 ulp of |w + e|). One
    mask entry kept or dropped wrongly changes that entry by |e| ~ rho / sqrt(kept) >> this tolerance.
    """
    for a, b, e in zip(after, before, expected, strict=True):
        a, b = a.detach(), b.detach()
        want = b.double() + e
        ulp = torch.finfo(b.dtype).eps * float(want.abs().max())
        atol = ulp + 1e-5 * float(e.abs().max()) + 1e-12
        torch.testing.assert_close(a.double(), want, rtol=0, atol=atol)


def perturb(optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> list[torch.Tensor]:
    before = [p.detach().clone() for p in params]
    assert optimizer.first_step() is True
    assert optimizer.skipped_perturbation is False
    after = [p.detach().clone() for p in params]
    optimizer.restore()
    return [a.double() - b.double() for a, b in zip(after, before, strict=True)]


@pytest.mark.parametrize("zeros", [False, True], ids=["dense", "zeros"])
@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_zsharp_matches_reference(name: str, zeros: bool) -> None:
    model = model_with_grads(name, zeros=zeros)
    params, grads = grads_of(model)
    expected = ref.zsharp_ascent(grads)
    before = [p.detach().clone() for p in params]
    optimizer = ZSharp(model.parameters(), torch.optim.SGD, lr=0.1)
    assert optimizer.first_step() is True
    assert_moved_by(list(params), before, expected)
    masks = [ref.zscore_mask(g, 0.95) if g.ndim > 1 else None for g in grads]
    moved = sum(
        g.numel() if m is None or not m.any() else int(m.sum()) for g, m in zip(grads, masks, strict=True)
    )
    stats = optimizer.ascent_stats
    assert stats["kept_fraction"] == pytest.approx(moved / sum(g.numel() for g in grads))
    total = torch.stack([e.norm() for e in expected]).norm()
    assert stats["perturbation_norm"] == pytest.approx(float(total), rel=1e-5)


def test_untouched_without_gradient() -> None:
    model = model_with_grads("mlp", zeros=True)
    last = list(model.parameters())[-1]
    assert last.grad is None
    before = last.detach().clone()
    optimizer = ZSharp(model.parameters(), torch.optim.SGD, lr=0.1)
    optimizer.first_step()
    assert torch.equal(last, before)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", ["mlp", "vit"])
def test_zsharp_low_precision_matches_reference(name: str, dtype: torch.dtype) -> None:
    """bf16/fp16 params and grads. Weights are zeroed after backward so that w + e = round(e) exactly shows e."""
    model = model_with_grads(name, dtype=dtype, zeros=True)
    params, grads = grads_of(model)
    assert all(g.dtype == dtype for g in grads)
    with torch.no_grad():
        for p in params:
            p.zero_()
    expected = ref.zsharp_ascent(grads)
    optimizer = ZSharp(model.parameters(), torch.optim.SGD, lr=0.1)
    assert optimizer.first_step() is True
    for p, e in zip(params, expected, strict=True):
        assert p.dtype == dtype
        # Kept/dropped entries agree exactly; values within the rounding of e to the dtype (2^-8 / 2^-11
        # relative, or the subnormal spacing tiny * eps for fp16's small values) plus fp32 arithmetic.
        info = torch.finfo(dtype)
        assert torch.equal(p != 0, (e.to(dtype) != 0))
        torch.testing.assert_close(p.double(), e, rtol=2 * info.eps, atol=info.tiny * info.eps)


@pytest.mark.parametrize("optimizer_cls", [ZSharp, SAM])
def test_float64_parameters_match_reference(optimizer_cls: type) -> None:
    """float64 models: norms are taken in float64 (a float32 norm would be a narrowing torch refuses)."""
    model = model_with_grads("mlp", dtype=torch.float64)
    params, grads = grads_of(model)
    expected = ref.zsharp_ascent(grads) if optimizer_cls is ZSharp else ref.sam_ascent(grads)
    before = [p.detach().clone() for p in params]
    optimizer = optimizer_cls(model.parameters(), torch.optim.SGD, lr=0.1)
    assert optimizer.first_step() is True
    assert_moved_by(list(params), before, expected)
    optimizer.second_step()
    assert all(p.dtype == torch.float64 for p in params)


@pytest.mark.parametrize("zeros", [False, True], ids=["dense", "zeros"])
@pytest.mark.parametrize("name", ["cnn", "vit"])
def test_global_radius_matches_reference(name: str, zeros: bool) -> None:
    model = model_with_grads(name, zeros=zeros)
    params, grads = grads_of(model)
    expected = ref.zsharp_ascent(grads, rho=0.1, radius="global")
    before = [p.detach().clone() for p in params]
    optimizer = ZSharp(model.parameters(), torch.optim.SGD, rho=0.1, radius="global", lr=0.1)
    optimizer.first_step()
    assert_moved_by(list(params), before, expected)
    assert optimizer.ascent_stats["perturbation_norm"] == pytest.approx(0.1, rel=1e-5)


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_percentile_zero_is_sam_exactly(name: str) -> None:
    model = model_with_grads(name)
    params, grads = grads_of(model)
    zsharp = perturb(ZSharp(model.parameters(), torch.optim.SGD, percentile=0.0, lr=0.1), params)
    sam = perturb(SAM(model.parameters(), torch.optim.SGD, lr=0.1), params)
    for z, s in zip(zsharp, sam, strict=True):
        assert torch.equal(z, s)
    before = [p.detach() for p in params]
    assert_moved_by([b.double() + s for b, s in zip(before, sam)], before, ref.sam_ascent(grads))


def test_magnitude_mask_matches_reference() -> None:
    model = model_with_grads("vit", zeros=True)
    params, grads = grads_of(model)
    expected = ref.zsharp_ascent(grads, mask="magnitude")
    before = [p.detach().clone() for p in params]
    optimizer = ZSharp(model.parameters(), torch.optim.SGD, mask="magnitude", lr=0.1)
    optimizer.first_step()
    assert_moved_by(list(params), before, expected)
    for p, b, g in zip(params, before, grads, strict=True):
        moved = p != b
        if g.ndim > 1 and moved.any() and not moved.all():
            assert g[moved].abs().min() >= g[~moved].abs().max()


@pytest.mark.parametrize("radius", ["tensor", "global"])
@pytest.mark.parametrize("zeros", [False, True], ids=["dense", "zeros"])
def test_no_mask_is_sam_normalised_per_tensor(radius: str, zeros: bool) -> None:
    """mask="none": every filtered tensor moves by rho along its gradient (its global-radius form is SAM)."""
    model = model_with_grads("cnn", zeros=zeros)
    params, grads = grads_of(model)
    expected = ref.zsharp_ascent(grads, mask="none", radius=radius)
    before = [p.detach().clone() for p in params]
    optimizer = ZSharp(model.parameters(), torch.optim.SGD, mask="none", radius=radius, lr=0.1)
    assert optimizer.first_step() is True
    assert_moved_by(list(params), before, expected)
    assert optimizer.ascent_stats["kept_fraction"] == 1.0
    total = torch.stack([e.norm() for e in expected]).norm()
    assert optimizer.ascent_stats["perturbation_norm"] == pytest.approx(float(total), rel=1e-5)


def test_random_mask_same_sparsity_and_seeded() -> None:
    model = model_with_grads("vit")
    params, grads = grads_of(model)

    def random_perturbation(seed: int) -> list[torch.Tensor]:
        optimizer = ZSharp(model.parameters(), torch.optim.SGD, mask="random", seed=seed, lr=0.1)
        return perturb(optimizer, params)

    first, again, other = random_perturbation(3), random_perturbation(3), random_perturbation(4)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(first, other, strict=True))
    expected = ref.sam_ascent(grads)  # 1-D tensors: plain SAM
    for i, (e, g) in enumerate(zip(first, grads, strict=True)):
        if g.ndim > 1:
            kept = e != 0
            # Same count as the Z-score mask (random scores have no ties), direction rho * f / ||f||.
            assert int(kept.sum()) == int(ref.zscore_mask(g, 0.95).sum())
            f = g.double() * kept
            expected[i] = 0.05 * f / f.norm()
    before = [p.detach() for p in params]
    assert_moved_by([b.double() + e for b, e in zip(before, first)], before, expected)


@pytest.mark.parametrize("optimizer_cls", [ZSharp, SAM], ids=["zsharp", "sam"])
def test_scale_invariance(optimizer_cls: type) -> None:
    """GradScaler-style scaled gradients (x 2^16) give the same perturbation, to float rounding."""
    model = model_with_grads("cnn", zeros=True)
    params, _ = grads_of(model)
    optimizer = optimizer_cls(model.parameters(), torch.optim.SGD, lr=0.1)
    plain = perturb(optimizer, params)
    for p in params:
        p.grad.mul_(2.0**16)
    scaled = perturb(optimizer, params)
    for a, b in zip(scaled, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


def test_tensor_over_2_24_entries() -> None:
    """torch.quantile refuses > 2^24 entries; the optimizer must not, and must keep the exact mask."""
    n = 2**24 + 5
    big = nn.Parameter(torch.zeros(1, n))
    bias = nn.Parameter(torch.zeros(7))
    gen = torch.Generator().manual_seed(0)
    big.grad = torch.randn(1, n, generator=gen)
    bias.grad = torch.randn(7, generator=gen)
    expected = ref.zsharp_ascent([big.grad, bias.grad])
    mask = expected[0] != 0  # randn has no exact zeros: e != 0 exactly on the reference mask
    optimizer = ZSharp([big, bias], torch.optim.SGD, lr=0.1)
    assert optimizer.first_step() is True
    assert torch.equal(big != 0, mask)
    # torch's CPU float32 norm accumulates sequentially: ~1e-3 relative error on 2^24 entries (the global
    # norm that scales the bias), ~1e-5 on the ~8e5 kept entries.
    torch.testing.assert_close(big.double(), expected[0], rtol=1e-4, atol=1e-12)
    torch.testing.assert_close(bias.double(), expected[1], rtol=2e-3, atol=1e-12)
    optimizer.restore()
    assert not big.any()


def test_quantile_rank_as_torch_quantile() -> None:
    """torch.quantile forms the rank float32(q) * (n - 1) in float64. For n = 2207542 (the smallest such
    size at q = 0.95; also 3072 x 3072 kernels, BERT's 30522 x 768 embeddings) that rank, 2097163.92,
    differs in its integer part from a product rounded to float32 (2097164.0): the paper's code keeps one
    entry more than such a rank would."""
    n = 2207542
    assert float(torch.tensor(0.95) * (n - 1)) == 2097164.0
    gen = torch.Generator().manual_seed(0)
    w = nn.Parameter(torch.zeros(1, n))
    w.grad = torch.randn(w.shape, generator=gen)
    mask = ref.zscore_mask(w.grad, 0.95)
    assert int(mask.sum()) == n - 2097163 - 1
    ZSharp([w], torch.optim.SGD, lr=0.1).first_step()
    assert torch.equal(w != 0, mask)


@pytest.mark.parametrize(
    ("shape", "q"), [((7, 13), 0.95), ((40, 25), 0.95), ((3, 1000), 0.95), ((91,), 0.8), ((26,), 0.6)]
)
def test_reference_quantile_is_torch_quantile(shape: tuple[int, ...], q: float) -> None:
    """The reference's own quantile equals torch.quantile (the paper's call), float32 rank included."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen).abs()
    x.view(-1)[::5] = 0.25  # ties
    assert float(ref.exact_quantile(x, q)) == pytest.approx(float(torch.quantile(x.flatten(), q)), rel=1e-6)
    g = torch.randn(shape, generator=gen)
    z = (g - g.mean()) / (g.std() + 1e-12)
    assert torch.equal(ref.zscore_mask(g, q), z.abs() > torch.quantile(z.abs().flatten(), q))
