"""mfm.py: parameter count (METHOD.md §3), shapes at any feature size, the fusion invariant, masking statistics,
gradient flow, multi-level mode, and that the file stands alone."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mfm
from mfm import Rebuilder, mfm_loss, weighted_cross_entropy


def small(**kw):
    args = dict(in_channels=32, embed_dim=32, grid=4, depth=2, num_heads=4)
    args.update(kw)
    return Rebuilder(**args)


def test_default_parameter_count():
    r = Rebuilder()
    def count(m):
        return sum(p.numel() for p in m.parameters())
    assert count(r) == 10_246_016
    assert count(r.embed) == 1_049_088
    assert count(r.blocks) + count(r.norm) == 6_305_792
    assert count(r.projectors) == 2_890_624


@pytest.mark.parametrize("size", [8, 16, 65])
def test_any_feature_size(size):
    torch.manual_seed(0)
    feats = torch.randn(2, 32, size, size + 3)
    rec, mask = small()(feats)
    assert rec.shape == feats.shape
    assert mask.shape == (2, 1, size, size + 3)


def test_paper_size_gives_exact_projector_resolution():
    r = Rebuilder(in_channels=64, embed_dim=64, grid=16, num_heads=4)
    assert r.projectors[0](torch.zeros(1, 64, 16, 16)).shape[-2:] == (64, 64)  # 4g = 64 = 512 / 8


def test_visible_positions_pass_through_untouched():
    torch.manual_seed(0)
    feats = torch.randn(3, 32, 16, 16)
    rec, mask = small()(feats)
    visible = mask.expand_as(feats) == 0
    assert visible.any() and (~visible).any()
    assert torch.equal(rec[visible], feats[visible])
    assert not torch.allclose(rec[~visible], feats[~visible])


def test_mask_is_grid_aligned_and_new_each_call():
    torch.manual_seed(0)
    r = small(grid=4)
    _, m1 = r(torch.randn(2, 32, 16, 16))
    _, m2 = r(torch.randn(2, 32, 16, 16))
    cells = m1.reshape(2, 1, 4, 4, 4, 4)  # (B, 1, gy, cell_y, gx, cell_x)
    assert torch.equal(cells, cells[:, :, :, :1, :, :1].expand_as(cells))
    assert not torch.equal(m1, m2)


def test_masked_fraction_is_bernoulli_mask_ratio():
    torch.manual_seed(0)
    r = small(grid=16, mask_ratio=0.4)
    fractions = torch.stack([r.random_masking(4, "cpu").mean() for _ in range(200)])
    assert abs(1 - fractions.mean().item() - 0.4) < 0.01
    assert fractions.std() > 0  # random per sample, not an exact ratio


def test_gradients_reach_encoder_decoder_and_every_rebuilder_parameter():
    torch.manual_seed(0)
    r = small()
    decoder = nn.Conv2d(32, 5, 3, padding=1)
    feats = torch.randn(2, 32, 8, 8, requires_grad=True)
    label = torch.randint(0, 5, (2, 64, 64))
    mfm_loss(decoder, r, feats, label, 0.7).backward()
    assert feats.grad is not None and feats.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in decoder.parameters())
    missing = [n for n, p in r.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, missing


def test_multi_level_mode():
    torch.manual_seed(0)
    r = Rebuilder(in_channels=[8, 16, 24, 32], embed_dim=32, grid=4, num_heads=4)
    levels = [torch.randn(2, c, s, s) for c, s in zip([8, 16, 24, 32], [32, 16, 8, 4])]
    rec, mask = r(levels)
    assert [t.shape for t in rec] == [t.shape for t in levels]
    assert mask.shape == (2, 1, 4, 4)
    for f, g in zip(levels, rec):  # the same cells are masked on every level
        m = F.interpolate(mask, size=f.shape[-2:], mode="nearest").expand_as(f)
        assert torch.equal(g[m == 0], f[m == 0])
        assert not torch.allclose(g[m == 1], f[m == 1])


def test_embedding_order_is_equivalent_to_the_papers():
    """Embed-then-resize (paper) equals resize-then-embed (ours): both maps are linear, resize weights sum to 1."""
    torch.manual_seed(0)
    r = small(grid=4)
    nn.init.normal_(r.embed.bias)
    feats = torch.randn(2, 32, 13, 9)
    paper = F.interpolate(r.embed(feats.permute(0, 2, 3, 1)).permute(0, 3, 1, 2), size=(4, 4),
                          mode="bilinear", align_corners=False)
    assert torch.allclose(r.embed_tokens(feats), paper, atol=1e-5)


def test_sincos_position_embedding_matches_brute_force():
    dim, g = 16, 5
    pe = mfm.sincos_pos_embed(dim, g).numpy()
    quarter = dim // 4
    for i in range(g):
        for j in range(g):
            row = pe[i * g + j]
            for k in range(quarter):
                w = 1.0 / 10000 ** (k / quarter)
                assert np.allclose([row[k], row[quarter + k], row[2 * quarter + k], row[3 * quarter + k]],
                                   [np.sin(i * w), np.cos(i * w), np.sin(j * w), np.cos(j * w)], atol=1e-6)
    assert not Rebuilder(in_channels=8, embed_dim=16, grid=5, num_heads=2).pos_embed.requires_grad


def test_block_matches_explicit_attention():
    torch.manual_seed(0)
    block = mfm.Block(16, num_heads=4, mlp_ratio=2.0)
    x = torch.randn(2, 7, 16)
    h = block.norm1(x)
    q, k, v = block.qkv(h).chunk(3, dim=-1)
    def split(t):
        return t.reshape(2, 7, 4, 4).transpose(1, 2)
    att = torch.softmax(split(q) @ split(k).transpose(-1, -2) / 2.0, dim=-1) @ split(v)
    y = x + block.proj(att.transpose(1, 2).reshape(2, 7, 16))
    y = y + block.mlp(block.norm2(y))
    assert torch.allclose(block(x), y, atol=1e-5)


def test_weighted_cross_entropy_matches_numpy_and_ignores_255():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 3, 5)
    label = torch.randint(0, 4, (2, 3, 5))
    label[0, 0, :] = 255
    weight = torch.rand(2, 3, 5)
    got = weighted_cross_entropy(logits, label, weight).item()
    lg, lb, w = logits.numpy().astype(np.float64), label.numpy(), weight.numpy()
    total = 0.0
    for b, y, x in np.ndindex(*lb.shape):
        if lb[b, y, x] != 255:
            p = np.exp(lg[b, :, y, x]) / np.exp(lg[b, :, y, x]).sum()
            total += -np.log(p[lb[b, y, x]]) * w[b, y, x]
    assert got == pytest.approx(total / lb.size, rel=1e-5)
    changed = logits.clone()
    changed[0, :, 0, :] = 100.0  # ignored pixels change nothing
    assert weighted_cross_entropy(changed, label, weight).item() == pytest.approx(got)


def test_mfm_loss_upsamples_and_returns_mask():
    torch.manual_seed(0)
    r = small()
    decoder = nn.Conv2d(32, 3, 1)
    feats = torch.randn(1, 32, 8, 8)
    label = torch.full((1, 64, 64), 255)
    loss, mask = mfm_loss(decoder, r, feats, label, 1.0, return_mask=True)
    assert loss.item() == 0.0 and mask.shape == (1, 1, 8, 8)


def test_bad_arguments():
    with pytest.raises(ValueError, match="mask_ratio"):
        Rebuilder(mask_ratio=1.0)
    with pytest.raises(ValueError, match="num_heads"):
        Rebuilder(embed_dim=100, num_heads=16)


def test_imports_alone_with_only_torch(tmp_path):
    """Copy mfm.py into an empty directory and import it there: no project module may be needed."""
    (tmp_path / "mfm.py").write_text(open(mfm.__file__).read())
    code = ("import sys, mfm, torch; r = mfm.Rebuilder(64, 32, 4, 1, 4); print(r(torch.randn(1, 64, 8, 8))[0].shape); "
            "print(mfm.__file__); print([m for m in ('models', 'data', 'train') if m in sys.modules])")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert str(tmp_path) in out.stdout and out.stdout.strip().endswith("[]")
    assert "torch.Size([1, 64, 8, 8])" in out.stdout
