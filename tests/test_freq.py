"""Frequency core: colour, block DCT, channel sets, PPFR-FD, frequency MixUp, HybridMask."""
from __future__ import annotations

import pytest
import torch
import torch_dct

from hybridmask.freq import (BatchMask, BlockDCT, FreqMixUp, HybridMask, MaskedDataset, MaskTransform, PPFRFD,
                             block_dct, block_idct, dct_matrix, resolve_drop, rgb_to_ycbcr, sample_weights,
                             split_channels, ycbcr_to_rgb, zigzag_order)
from hybridmask.utils import HybridMaskInputError


def rand_images(b=4, size=112, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(b, 3, size, size, generator=g, dtype=dtype) * 2 - 1)


# ---------------------------------------------------------------- colour and DCT
def test_dct_matrix_is_orthonormal():
    d = dct_matrix(8)
    assert torch.allclose(d @ d.T, torch.eye(8, dtype=d.dtype), atol=1e-12)
    assert torch.allclose(d.T @ d, torch.eye(8, dtype=d.dtype), atol=1e-12)


def test_ycbcr_round_trip_and_jpeg_values():
    x = rand_images(2)
    assert (ycbcr_to_rgb(rgb_to_ycbcr(x)) - x).abs().max() < 1e-5
    # pure white is Y=1 with zero chroma; pure red matches the JPEG matrix
    white = torch.ones(1, 3, 8, 8)
    assert torch.allclose(rgb_to_ycbcr(white)[0, :, 0, 0], torch.tensor([1.0, 0.0, 0.0]), atol=1e-6)
    red = torch.zeros(1, 3, 8, 8)
    red[:, 0] = 1
    red = red * 2 - 1  # (255,0,0) in [-1,1]
    ycc = (rgb_to_ycbcr(red)[0, :, 0, 0] * 127.5 + 127.5) - torch.tensor([0.0, 127.5 - 128, 127.5 - 128])
    assert torch.allclose(ycc, torch.tensor([76.245, 84.972, 255.5]), atol=0.05)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("u", [1, 2])
def test_block_dct_round_trip_exact(dtype, tol, u):
    x = rand_images(2, dtype=dtype)
    t = BlockDCT(u)
    c = t(x)
    assert c.shape == (2, 192, 14 * u, 14 * u) and c.dtype == dtype
    if u == 1:
        assert (t.inverse(c) - x).abs().max() < tol
    # the DCT stage itself is exact at every u
    y = torch.randn(2, 3, 112 * u, 112 * u, dtype=dtype)
    assert (block_idct(block_dct(y)) - y).abs().max() < tol


def test_block_dct_agrees_with_torch_dct_on_every_block():
    x = torch.randn(2, 3, 32, 24, dtype=torch.float64)
    c = block_dct(x)  # (2, 192, 4, 3)
    for bi in range(4):
        for bj in range(3):
            ref = torch_dct.dct_2d(x[:, :, bi * 8:(bi + 1) * 8, bj * 8:(bj + 1) * 8], norm="ortho")
            got = c[:, :, bi, bj].reshape(2, 3, 8, 8)  # channel c*64 + row*8 + col
            assert torch.allclose(got, ref, atol=1e-10), (bi, bj)


def test_channel_layout_dc_is_block_mean():
    x = rand_images(1)
    c = block_dct(rgb_to_ycbcr(x))
    y = rgb_to_ycbcr(x)
    block_mean = y.reshape(1, 3, 14, 8, 14, 8).mean(dim=(3, 5))
    for col in range(3):
        assert torch.allclose(c[:, col * 64], block_mean[:, col] * 8, atol=1e-5)


def test_energy_concentrates_in_dc_on_smooth_images():
    # a smooth image: DC carries almost all energy (the reason PPFR-FD drops it)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 112), torch.linspace(-1, 1, 112), indexing="ij")
    img = torch.stack([0.5 * torch.sin(2 * xx), 0.3 * yy, 0.2 * xx * yy]).unsqueeze(0)
    c = BlockDCT(1)(img)
    e = c.pow(2).sum(dim=(0, 2, 3))
    dc = e[[0, 64, 128]].sum() / e.sum()
    assert dc > 0.94


def test_zigzag_and_named_sets():
    zz = zigzag_order()
    assert sorted(zz) == list(range(64)) and zz[:6] == [0, 1, 8, 16, 9, 2] and zz[-1] == 63
    assert resolve_drop("dc") == [0, 64, 128]
    assert len(resolve_drop("low10")) == 30 and 0 in resolve_drop("low10") and 1 in resolve_drop("low10")
    assert resolve_drop("none") == [] and resolve_drop([5, 3, 3]) == [3, 5]
    dropped, kept = split_channels("dc")
    assert len(kept) == 189 and set(dropped).isdisjoint(kept)
    with pytest.raises(ValueError, match="unknown channel set"):
        resolve_drop("dcc")
    with pytest.raises(ValueError, match=r"\[0, 192\)"):
        resolve_drop([0, 192])


def test_zero_filled_inverse_equals_image_minus_dropped():
    x = rand_images(2, dtype=torch.float64)
    t = BlockDCT(1)
    c = t(x)
    dropped, kept = split_channels("low10")
    part_kept = t.inverse(c[:, kept], kept=kept)
    part_dropped = t.inverse(c[:, dropped], kept=dropped)
    assert torch.allclose(part_kept, x - part_dropped, atol=1e-10)


def test_gradients_flow_through_the_whole_mask():
    x = rand_images(4).requires_grad_(True)
    hm = HybridMask(u=1, k=2, granularity="band", seed=0)
    masked, _ = hm(x)
    masked.pow(2).mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


# ---------------------------------------------------------------- PPFR-FD
def test_ppfrfd_drop_only_is_a_selection():
    c = BlockDCT(1)(rand_images(2))
    m = PPFRFD("dc", shuffle="none", mix="none", seed=0)
    assert torch.equal(m(c), c[:, [i for i in range(192) if i not in (0, 64, 128)]])


def test_ppfrfd_sample_shuffle_differs_per_sample_key_shuffle_does_not():
    c = BlockDCT(1)(rand_images(1)).expand(3, -1, -1, -1).contiguous()  # the same face three times
    per_sample = PPFRFD("dc", shuffle="sample", mix="neighbour", seed=0)(c)
    assert not torch.allclose(per_sample[0], per_sample[1])
    keyed = PPFRFD("dc", shuffle="key", mix="neighbour", seed=0)(c)
    assert torch.allclose(keyed[0], keyed[1]) and torch.allclose(keyed[1], keyed[2])
    # energy is preserved by a permutation; the neighbour mix conserves the channel sum * sqrt(2)
    sel = PPFRFD("dc", shuffle="none", mix="none")(c)
    perm_only = PPFRFD("dc", shuffle="sample", mix="none", seed=1)(c)
    assert torch.allclose(perm_only.pow(2).sum(dim=1), sel.pow(2).sum(dim=1), atol=1e-4)
    assert torch.allclose(per_sample.sum(dim=1), sel.sum(dim=1) * 2 ** 0.5, atol=1e-3)


def test_ppfrfd_neighbour_mix_is_invertible_for_odd_channel_counts():
    c = torch.randn(2, 192, 4, 4, dtype=torch.float64)
    m = PPFRFD("dc", shuffle="none", mix="neighbour")
    y = m(c)
    n = 189
    a = (torch.eye(n, dtype=torch.float64) + torch.roll(torch.eye(n, dtype=torch.float64), -1, dims=0)) / 2 ** 0.5  # S[i, i+1] = 1
    rec = torch.einsum("ij,bjhw->bihw", torch.linalg.inv(a), y)
    assert torch.allclose(rec, c[:, m.kept], atol=1e-9)


# ---------------------------------------------------------------- MixUp
def test_linearity_guard_image_granularity_equals_pixel_mixup():
    """BDCT is linear: one scalar weight per image makes frequency MixUp exactly pixel MixUp."""
    x = rand_images(6, dtype=torch.float64)
    t = BlockDCT(1)
    mixer = FreqMixUp(k=3, granularity="image", seed=0)
    mixed, rec = mixer(t(x))
    w = rec.weights.to(torch.float64)
    pixel_mix = sum(w[:, j].view(-1, 1, 1, 1) * x[rec.indices[:, j]] for j in range(3))
    assert torch.allclose(mixed, t(pixel_mix), atol=1e-10)
    # the same holds through HybridMask when mixing before an unkeyed mask
    hm = HybridMask(k=3, order="mix_mask", shuffle="none", mix="none", seed=1)
    out, rec = hm(x)
    w = rec.weights.to(torch.float64)
    pixel_mix = sum(w[:, j].view(-1, 1, 1, 1) * x[rec.indices[:, j]] for j in range(3))
    assert torch.allclose(out, hm.ppfrfd(t(pixel_mix)), atol=1e-10)


@pytest.mark.parametrize("granularity", ["band", "channel"])
def test_linearity_guard_band_and_channel_weights_are_not_pixel_mixup(granularity):
    x = rand_images(6, dtype=torch.float64)
    t = BlockDCT(1)
    mixed, rec = FreqMixUp(k=3, granularity=granularity, seed=0)(t(x))
    # the best scalar-weight pixel mix of the same sources (least squares) cannot reproduce it
    for b in range(3):
        srcs = torch.stack([t(x[rec.indices[b, j]].unsqueeze(0)).flatten() for j in range(3)], dim=1)
        coef = torch.linalg.lstsq(srcs, mixed[b].flatten().unsqueeze(1)).solution
        resid = (srcs @ coef).squeeze(1) - mixed[b].flatten()
        assert resid.norm() / mixed[b].norm() > 0.05


def test_mask_then_mix_with_per_sample_shuffle_is_not_pixel_mixup():
    x = rand_images(6, dtype=torch.float64)
    hm = HybridMask(k=2, order="mask_mix", shuffle="sample", mix="none", seed=0)
    out, rec = hm(x)
    w = rec.weights.to(torch.float64)
    pixel_mix = sum(w[:, j].view(-1, 1, 1, 1) * x[rec.indices[:, j]] for j in range(2))
    plain = HybridMask(k=1, shuffle="none", mix="none").encode(pixel_mix)
    assert (out - plain).norm() / plain.norm() > 0.5


@pytest.mark.parametrize("method", ["instahide", "dirichlet"])
def test_weights_on_simplex_and_under_bound(method):
    g = torch.Generator().manual_seed(0)
    k = torch.tensor([1, 2, 3, 4, 5, 6] * 50)
    w = sample_weights(k, 6, 7, method, g, max_weight=0.65, alpha=0.7)
    assert (w >= 0).all()
    assert torch.allclose(w.sum(dim=1), torch.ones_like(w.sum(dim=1)), atol=1e-9)
    nz = (w > 0).sum(dim=1)  # non-zero count per sample and group equals k
    assert torch.equal(nz, k.unsqueeze(1).expand_as(nz))
    if method == "instahide":
        assert (w[k > 1].max(dim=1).values <= 0.65 + 1e-9).all()
        assert torch.allclose(w[k == 1, 0], torch.ones_like(w[k == 1, 0]))


def test_dirichlet_mean_matches_theory():
    g = torch.Generator().manual_seed(0)
    w = sample_weights(torch.full((4000,), 3), 3, 1, "dirichlet", g, alpha=0.5)
    assert torch.allclose(w.mean(dim=(0, 2)), torch.full((3,), 1 / 3, dtype=w.dtype), atol=0.02)
    # Var of Dirichlet(0.5,0.5,0.5) marginal: a(a0-a)/(a0^2(a0+1)) = 0.5*1/(2.25*2.5)
    assert abs(w[:, 0, 0].var().item() - 0.5 / (2.25 * 2.5)) < 0.01


def test_partners_are_distinct_and_never_the_anchor():
    x = torch.randn(8, 189, 2, 2)
    k = torch.tensor([1, 2, 3, 4, 5, 6, 8, 2])
    _, rec = FreqMixUp(seed=0)(x, k=k)
    for b in range(8):
        used = rec.indices[b, : k[b]].tolist()
        assert used[0] == b and len(set(used)) == k[b]
        assert torch.all(rec.weights[b, k[b]:] == 0)
    assert torch.allclose(rec.label_weights.sum(dim=1), torch.ones(8))


def test_k_as_callable_and_soft_labels():
    x = torch.randn(6, 10, 2, 2)
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    _, rec = FreqMixUp(k=lambda t: torch.full((t.shape[0],), 3), seed=0)(x)
    assert rec.k.tolist() == [3] * 6
    soft = rec.soft_labels(labels, 6)
    assert torch.allclose(soft.sum(dim=1), torch.ones(6)) and (soft > 0).sum(dim=1).eq(3).all()


def test_pool_partners_and_pool_labels():
    x = rand_images(3)
    pool = rand_images(10, seed=1)
    hm = HybridMask(k=4, pool=pool, seed=0)
    out, rec = hm(x)
    assert out.shape == (3, 189, 14, 14) and rec.source == "pool"
    ml = rec.mixed_labels(torch.tensor([7, 8, 9]))
    assert ml[:, 0].tolist() == [7, 8, 9] and (ml[:, 1:] == -1).all()
    soft = rec.soft_labels(torch.tensor([0, 1, 2]), 3)
    assert torch.allclose(soft, torch.eye(3))  # unlabeled public partners carry no label


def test_determinism_with_seed_and_difference_across_default_instances():
    x = rand_images(8)
    a, ra = HybridMask(k=3, seed=123)(x)
    b, rb = HybridMask(k=3, seed=123)(x)
    assert torch.equal(a, b) and torch.equal(ra.indices, rb.indices)
    c, _ = HybridMask(k=3)(x)
    d, _ = HybridMask(k=3)(x)
    assert not torch.allclose(c, d)


def test_global_torch_seed_does_not_determine_the_secret():
    x = rand_images(8)
    torch.manual_seed(0)
    a, _ = HybridMask(k=3)(x)
    torch.manual_seed(0)
    b, _ = HybridMask(k=3)(x)
    assert not torch.allclose(a, b)


def test_secret_state_round_trip_gives_exact_resume():
    x = rand_images(8)
    hm = HybridMask(k=3, shuffle="key", seed=5)
    hm(x)
    state = hm.secret_state()
    a, _ = hm(x)
    hm2 = HybridMask(k=3, shuffle="key", seed=99)
    hm2.load_secret_state(state)
    b, _ = hm2(x)
    assert torch.equal(a, b)


def test_config_round_trip():
    hm = HybridMask(u=2, drop="low10", k=4, granularity="band", seed=0)
    hm2 = HybridMask.from_config(hm.config, seed=0)
    assert hm2.config == hm.config and hm2.out_channels == 162 and hm2.grid(112) == 28
    with pytest.raises(KeyError, match="unknown HybridMask config"):
        HybridMask.from_config({"u": 1, "bogus": 3})


# ---------------------------------------------------------------- errors
@pytest.mark.parametrize("k,match", [(0, "k must be >= 1"), (5, "must be <= batch size"), (2.5, "integer")])
def test_bad_k_is_reported(k, match):
    with pytest.raises(HybridMaskInputError, match=match):
        HybridMask(k=k, seed=0)(rand_images(4))


def test_bad_inputs_are_reported():
    hm = HybridMask(seed=0)
    x = rand_images(2)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(HybridMaskInputError, match="NaN"):
        hm(x)
    with pytest.raises(HybridMaskInputError, match="3 channels"):
        hm(torch.rand(2, 4, 112, 112))
    with pytest.raises(HybridMaskInputError, match="divisible by 8"):
        hm(torch.rand(2, 3, 100, 100))
    with pytest.raises(HybridMaskInputError, match="divisible by 4"):
        HybridMask(u=2)(torch.rand(2, 3, 102, 102))
    HybridMask(u=2, seed=0)(torch.rand(2, 3, 100, 100) * 2 - 1)  # 100 * 2 is divisible by 8: fine
    with pytest.raises(HybridMaskInputError, match="floating-point"):
        hm(torch.zeros(2, 3, 112, 112, dtype=torch.uint8))
    with pytest.raises(HybridMaskInputError, match=r"shape \(B, 3, H, W\)"):
        hm(torch.rand(3, 112, 112))
    with pytest.raises(HybridMaskInputError, match="189 channels"):
        hm.as_image(torch.rand(2, 192, 14, 14))
    with pytest.raises(HybridMaskInputError, match="192 channels"):
        PPFRFD()(torch.rand(2, 189, 14, 14))
    with pytest.raises(HybridMaskInputError, match="infeasible"):
        FreqMixUp(k=2, max_weight=0.4, seed=0)(torch.randn(4, 8, 2, 2))
    with pytest.raises(ValueError, match="upsample factor"):
        BlockDCT(3)
    with pytest.raises(ValueError, match="order must be"):
        HybridMask(order="sideways")


# ---------------------------------------------------------------- transforms
def test_batch_and_dataset_transforms():
    x, y = rand_images(6), torch.arange(6)
    hm = HybridMask(k=2, seed=0)
    masked, labels_k, lw, rec = BatchMask(hm)(x, y)
    assert masked.shape == (6, 189, 14, 14) and labels_k.shape == (6, 2) and torch.equal(labels_k[:, 0], y)
    ds = MaskedDataset(list(zip(x, y)), hm)
    img, label = ds[2]
    assert img.shape == (189, 14, 14) and label == 2
    with pytest.raises(HybridMaskInputError, match="public pool"):
        MaskTransform(hm, k=3)
    pooled = HybridMask(k=1, pool=rand_images(5, seed=3), seed=0)
    assert MaskTransform(pooled, k=3)(x[0]).shape == (189, 14, 14)


# ---------------------------------------------------------------- real faces
def _load_lfw(root, n=64):
    import numpy as np
    from PIL import Image
    files = sorted((root / "lfw_112").glob("*/*.jpg"))[: n * 7: 7][:n]
    arr = np.stack([np.asarray(Image.open(f).convert("RGB"), dtype=np.float32) for f in files])
    return torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1


@pytest.mark.realdata
def test_real_faces_zero_filled_view_and_exact_full_inverse(faces_root):
    """The full BDCT inverse is exact, and the zero-filled picture of a PPFR-FD release looks nothing like the
    face. That is a statement about the *picture* only, not a privacy claim: the release itself is inverted by
    the structure-aware attack (tests/test_structure_attack.py, docs/attacks/calibration.md: 97 % rank-1)."""
    from skimage.metrics import structural_similarity
    x = _load_lfw(faces_root, 64)
    assert x.shape == (64, 3, 112, 112)
    hm = HybridMask(u=1, drop="dc", seed=0)
    t = hm.bdct
    assert (t.inverse(t(x)) - x).abs().max() < 1e-5          # the full inverse is exact
    masked = hm.query(x)
    assert masked.shape == (64, 189, 14, 14)
    assert HybridMask(u=2, seed=0).query(x[:4]).shape == (4, 189, 28, 28)
    view = hm.as_image(masked)                                 # zero-filled inverse of PPFR-FD output

    def ssim(a, b):
        a = ((a + 1) * 127.5).permute(1, 2, 0).numpy()
        b = ((b + 1) * 127.5).permute(1, 2, 0).numpy()
        return structural_similarity(a, b, channel_axis=2, data_range=255)

    s_masked = [ssim(view[i], x[i]) for i in range(64)]
    assert max(s_masked) < 0.5, max(s_masked)
    # drop-only (no shuffle) keeps structure that the shuffle destroys: the test can tell them apart
    plain = HybridMask(u=1, drop="dc", shuffle="none", mix="none")
    s_plain = [ssim(plain.as_image(plain.query(x[i:i + 1]))[0], x[i]) for i in range(8)]
    assert sum(s_plain) / 8 > sum(s_masked[:8]) / 8


@pytest.mark.parametrize("u", [1, 2])
@pytest.mark.parametrize("shuffle,mix", [("sample", "neighbour"), ("key", "none"), ("none", "neighbour")])
def test_fast_encode_equals_the_step_by_step_pipeline(u, shuffle, mix):
    """encode() fuses colour with the block regrouping and gathers the shuffled, mixed channels in
    one pass; it must equal the textbook steps (colour, upsample, block DCT, select, then the
    per-sample shuffle-and-mix) with the same secret draws."""
    x = rand_images(3, dtype=torch.float64)
    a = HybridMask(u=u, shuffle=shuffle, mix=mix, seed=7)
    b = HybridMask(u=u, shuffle=shuffle, mix=mix, seed=7)
    for xx, tol in ((x, 1e-10), (x.float(), 1e-4)):
        y = rgb_to_ycbcr(xx)
        if u > 1:
            y = torch.nn.functional.interpolate(y, scale_factor=u, mode="bilinear", align_corners=False)
        steps = b.ppfrfd.scramble(block_dct(y).index_select(1, torch.tensor(b.kept)))
        assert torch.allclose(a.encode(xx), steps, atol=tol)
    # the per-sample linear map view (scramble_rows) draws the same secrets as scramble
    c, d = HybridMask(u=1, shuffle=shuffle, mix=mix, seed=3), HybridMask(u=1, shuffle=shuffle, mix=mix, seed=3)
    w = torch.randn(189, 5, dtype=torch.float64)
    v = torch.randn(2, 5, 1, dtype=torch.float64)
    lhs = torch.matmul(c.ppfrfd.scramble_rows(w, 2), v)
    rhs = d.ppfrfd.scramble(torch.matmul(w, v).unsqueeze(-1))
    assert torch.allclose(lhs, rhs.squeeze(-1), atol=1e-10)


# ---------------------------------------------------------------- BDCT for u > 1 as one strided convolution
def _bdct_pair(u):
    return BlockDCT(u), BlockDCT(u, method="reference")


def _assert_paths_agree(u, x, tol):
    fast, ref = _bdct_pair(u)
    a, r = fast(x), ref(x)
    assert a.shape == r.shape == (x.shape[0], 192, x.shape[-2] * u // 8, x.shape[-1] * u // 8)
    assert a.dtype == x.dtype
    err = (a - r).abs()
    # the border blocks (where bilinear upsampling clamps) are checked on their own, not only in the max
    assert err[..., 0, :].max() < tol and err[..., -1, :].max() < tol
    assert err[..., :, 0].max() < tol and err[..., :, -1].max() < tol
    assert err.max() < tol, (u, tuple(x.shape), x.dtype, err.max().item())


@pytest.mark.realdata
@pytest.mark.parametrize("u", [2, 4, 8])
def test_conv_bdct_equals_upsampling_reference_on_real_faces(faces_root, u):
    x = _load_lfw(faces_root, 16)
    _assert_paths_agree(u, x, 1e-5)
    # the float32 conv is closer to the float64 result than the float32 reference is (~2e-6 vs ~8e-6)
    assert (BlockDCT(u)(x).double() - BlockDCT(u, method="reference")(x.double())).abs().max() < 4e-6
    _assert_paths_agree(u, x[:5].double(), 1e-10)
    # a crop at odd offsets, not square: other pixels at the borders, blocks at odd positions
    s = 8 // u
    crop = x[:5, :, 1:1 + 13 * 8, 3:3 + 11 * 8]
    assert crop.shape[-2] % s == 0 and crop.shape[-1] % s == 0
    _assert_paths_agree(u, crop, 1e-5)
    _assert_paths_agree(u, x[:1].contiguous(memory_format=torch.channels_last), 1e-5)


@pytest.mark.parametrize("u", [2, 4, 8])
@pytest.mark.parametrize("b", [1, 5])
def test_conv_bdct_equals_upsampling_reference_on_random_images(u, b):
    _assert_paths_agree(u, rand_images(b, seed=u + b), 1e-5)
    _assert_paths_agree(u, rand_images(b, seed=u, dtype=torch.float64), 1e-10)
    extremes = torch.randint(0, 2, (b, 3, 112, 112), generator=torch.Generator().manual_seed(b)).float() * 2 - 1
    _assert_paths_agree(u, extremes, 1e-5)                     # worst case for float rounding: all |x| = 1
    g = torch.Generator().manual_seed(7)
    for h, w in ((56, 104), (8 // u, 3 * 8 // u), (16, 8)):   # non-square, down to a single block row
        _assert_paths_agree(u, torch.rand(b, 3, h, w, generator=g) * 2 - 1, 1e-5)


@pytest.mark.parametrize("u", [2, 4, 8])
def test_conv_bdct_is_one_strided_convolution_of_the_replicate_padded_image(u):
    """conv_weight() is the impulse response of the reference path, and the strided conv2d with it
    on the replicate-padded image is the transform, borders included."""
    fast, ref = _bdct_pair(u)
    s, k = 8 // u, 8 // u + 2
    w = fast.conv_weight()
    assert w.shape == (192, 3, k, k) and w.dtype == torch.float64
    n = 4 * s                                                   # block (1, 1) lies inside the image
    imp = torch.zeros(3 * k * k, 3, n, n, dtype=torch.float64)
    for j, (r, m, q) in enumerate((r, m, q) for r in range(3) for m in range(k) for q in range(k)):
        imp[j, r, s - 1 + m, s - 1 + q] = 1.0
    response = ref(imp)[:, :, 1, 1].t().reshape(192, 3, k, k)
    assert torch.allclose(response, w, atol=1e-12)
    x = rand_images(2, dtype=torch.float64, seed=11)[..., :56, :]
    conv = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate"), w, stride=s)
    assert torch.allclose(conv, ref(x), atol=1e-10)
    assert torch.allclose(conv, fast(x), atol=1e-10)
    with pytest.raises(ValueError, match="u > 1"):
        BlockDCT(1).conv_weight()
    with pytest.raises(ValueError, match="method"):
        BlockDCT(8, method="fft")


@pytest.mark.parametrize("u", [2, 4, 8])
def test_conv_bdct_gradients_flow_and_equal_the_reference_gradients(u):
    """Attacks back-propagate through the BDCT: the gradient of the fast path is the reference's."""
    fast, ref = _bdct_pair(u)
    x = rand_images(2, seed=5, size=32)
    up = torch.randn(2, 192, 32 * u // 8, 32 * u // 8, generator=torch.Generator().manual_seed(1))
    grads = []
    for t in (fast, ref):
        xx = x.clone().requires_grad_(True)
        (t(xx) * up).sum().backward()
        grads.append(xx.grad)
    assert grads[0].abs().sum() > 0
    assert (grads[0] - grads[1]).abs().max() < 1e-5
    s = 8 // u                                                  # 2 x 3 blocks: borders on every side
    small = (torch.rand(1, 3, 2 * s, 3 * s, dtype=torch.float64) * 2 - 1).requires_grad_(True)
    assert torch.autograd.gradcheck(fast, (small,), fast_mode=True)


def test_conv_bdct_keeps_float64_exact_after_the_module_is_cast():
    x = rand_images(1, dtype=torch.float64)
    t = BlockDCT(8).float()                                     # buffers now float32
    assert (t(x) - BlockDCT(8, method="reference")(x)).abs().max() < 1e-10
    assert "method='reference'" in repr(BlockDCT(4, method="reference")) and repr(BlockDCT(4)) == "BlockDCT(u=4)"
