"""mfm.py: parameter counts (METHOD.md §3, single- and multi-level), shapes at any feature size, the released
projectors against stacks written from METHOD.md, the fusion invariant, that masked input cells cannot leak,
one mask for tokens and fusion, masking statistics, gradient flow, the loss against a hand computation, and that
the file stands alone."""
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


MIT = [64, 128, 320, 512]  # MiT-B5 stage channels (SegFormer / DAFormer)


def count(m):
    return sum(p.numel() for p in m.parameters())


def small(**kw):
    args = dict(in_channels=32, embed_dim=32, grid=4, depth=2, num_heads=4)
    args.update(kw)
    return Rebuilder(**args)


def test_default_parameter_count():
    r = Rebuilder()
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


def test_released_multi_level_parameter_count():
    r = Rebuilder(in_channels=MIT)
    assert count(r) == 14_545_280
    assert count(r.embed) == 262_656 and r.mask_token.numel() == 512
    assert count(r.blocks) + count(r.norm) == 6_305_792
    assert [count(p) for p in r.projectors] == [2_893_248, 2_639_104, 2_180_288, 263_680]


@pytest.mark.parametrize("sizes", [[128, 64, 32, 16], [160, 80, 40, 20]])  # a 512 crop, a 640 crop
def test_multi_level_shapes_at_mit_geometry(sizes):
    torch.manual_seed(0)
    r = Rebuilder(in_channels=MIT, embed_dim=32, grid=16, num_heads=4)
    levels = [torch.randn(1, c, s, s) for c, s in zip(MIT, sizes)]
    with torch.no_grad():
        tokens = torch.zeros(1, 32, 16, 16)
        assert [p(tokens).shape[-2:] for p in r.projectors] == [(128, 128), (64, 64), (32, 32), (16, 16)]
        rec, mask = r(levels)
    assert [t.shape for t in rec] == [t.shape for t in levels]
    assert mask.shape == (1, 1, sizes[-1], sizes[-1])


@pytest.mark.parametrize("n, scales", [(1, [1]), (2, [2, 1]), (3, [4, 2, 1]), (4, [8, 4, 2, 1])])
def test_level_scale_is_fixed_by_position(n, scales):
    r = Rebuilder(in_channels=[8] * n, embed_dim=16, grid=2, num_heads=2)
    with torch.no_grad():
        assert [p(torch.zeros(1, 16, 2, 2)).shape[-1] for p in r.projectors] == [2 * s for s in scales]


class ChannelNorm(nn.Module):
    """Independent channel LayerNorm for the reference stacks: normalise over dim 1 by hand."""

    def __init__(self, c):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c))

    def forward(self, x):
        mu, var = x.mean(1, keepdim=True), x.var(1, unbiased=False, keepdim=True)
        return (x - mu) / torch.sqrt(var + 1e-6) * self.weight[:, None, None] + self.bias[:, None, None]


def released_projector(d, c, s):
    """METHOD.md §3's list of the released projectors, written out layer by layer."""
    def up(i, o):
        return nn.ConvTranspose2d(i, o, 4, stride=2, padding=1)
    return {8: lambda: nn.Sequential(up(d, d // 2), ChannelNorm(d // 2), nn.GELU(), up(d // 2, d // 4),
                                     ChannelNorm(d // 4), nn.GELU(), up(d // 4, d // 4), nn.Conv2d(d // 4, c, 1),
                                     ChannelNorm(c)),
            4: lambda: nn.Sequential(up(d, d // 2), ChannelNorm(d // 2), nn.GELU(), up(d // 2, d // 4),
                                     nn.Conv2d(d // 4, c, 1), ChannelNorm(c)),
            2: lambda: nn.Sequential(up(d, d // 2), nn.Conv2d(d // 2, c, 1), ChannelNorm(c)),
            1: lambda: nn.Sequential(nn.Conv2d(d, c, 1), ChannelNorm(c))}[s]()


def test_projectors_equal_the_released_stacks():
    """Copy our weights (by order, shapes checked) into stacks built from METHOD.md's list; same outputs."""
    torch.manual_seed(0)
    r = Rebuilder(in_channels=[8, 16, 24, 40], embed_dim=32, grid=4, num_heads=4)
    x = torch.randn(2, 32, 4, 4)
    for ours, c, s in zip(r.projectors, [8, 16, 24, 40], [8, 4, 2, 1]):
        ref = released_projector(32, c, s)
        ours_state, ref_state = list(ours.state_dict().values()), list(ref.state_dict().values())
        assert [t.shape for t in ours_state] == [t.shape for t in ref_state]
        with torch.no_grad():
            for a in ours_state:
                a.copy_(torch.randn_like(a))  # non-trivial LayerNorm affine too
            for a, b in zip(ours_state, ref_state):
                b.copy_(a)
            assert torch.allclose(ours(x), ref(x), atol=1e-5), s
    assert count(r.projectors[1]) == count(Rebuilder(in_channels=16, embed_dim=32, grid=4, num_heads=4).projectors)


def isolation_setup(levels):
    """A Rebuilder and features whose grid cells align with every level (cell = 4, 2, 1 feature pixels)."""
    torch.manual_seed(0)
    if levels == 1:
        return small(grid=4), torch.randn(2, 32, 16, 16)
    r = Rebuilder(in_channels=[8, 16, 32], embed_dim=32, grid=4, num_heads=4)
    return r, [torch.randn(2, c, s, s) for c, s in zip([8, 16, 32], [16, 8, 4])]


@pytest.mark.parametrize("levels", [1, 3])
def test_masked_cells_of_the_input_cannot_reach_the_output(levels, monkeypatch):
    """Changing the features only inside masked cells changes nothing: neither the reconstruction (the
    transformer sees the mask token there) nor the visible features. Changing visible cells does."""
    r, feats = isolation_setup(levels)
    keep = fixed_keep(r, monkeypatch, 2)
    many = feats if levels > 1 else [feats]
    visible = [cells_to_pixels(keep, f.shape[-1]).expand_as(f) for f in many]  # 1 = visible pixel
    moved_masked = [f + (1 - v) * 100 * torch.randn_like(f) for f, v in zip(many, visible)]
    moved_visible = [f + v * torch.randn_like(f) for f, v in zip(many, visible)]
    with torch.no_grad():
        outs = [r(x if levels > 1 else x[0])[0] for x in (many, moved_masked, moved_visible)]
    outs = [o if levels > 1 else [o] for o in outs]
    assert all(torch.equal(a, b) for a, b in zip(outs[0], outs[1]))
    hidden = visible[-1] == 0
    assert not torch.allclose(outs[0][-1][hidden], outs[2][-1][hidden])  # the reconstruction reads visible cells


@pytest.mark.parametrize("levels", [1, 3])
def test_transformer_sees_the_mask_token_exactly_on_the_returned_mask(levels):
    """The token mask and the fusion mask are one draw: the tokens entering the first block equal
    mask_token + position embedding on the cells the returned mask marks, and only there."""
    r, feats = isolation_setup(levels)
    seen = []
    r.blocks[0].register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    with torch.no_grad():
        _, mask = r(feats)
    tokens = seen[0]  # (B, g*g, C')
    k = mask.shape[-1] // r.grid
    cells = mask[:, 0, ::k, ::k].reshape(2, -1).bool()  # (B, g*g) 1 = masked
    filled = r.mask_token.detach().reshape(1, 1, -1) + r.pos_embed  # (1, g*g, C')
    same = (tokens == filled).all(-1)  # (B, g*g)
    assert cells.any() and (~cells).any()
    assert torch.equal(same, cells)


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


def fixed_keep(rebuilder, monkeypatch, batch, seed=0):
    """Replace the random grid mask by a seeded one with both kinds of cells; returns keep (B, 1, g, g)."""
    g = torch.Generator().manual_seed(seed)
    keep = (torch.rand(batch, 1, rebuilder.grid, rebuilder.grid, generator=g) >= 0.4).float()
    assert 0 < keep.mean() < 1
    monkeypatch.setattr(rebuilder, "random_masking", lambda b, device: keep)
    return keep


def cells_to_pixels(keep, h):
    """(B, 1, g, g) -> (B, 1, h, h) by repeating each cell h/g times (nearest resize, written out)."""
    k = h // keep.shape[-1]
    return keep.repeat_interleave(k, dim=-2).repeat_interleave(k, dim=-1)


def test_mfm_loss_matches_a_hand_computation(monkeypatch):
    """Hand-fused features -> decoder -> bilinear upsample -> CE * per-pixel weight, averaged over ALL pixels
    (ignored ones count 0), in float64 with log-softmax written out."""
    torch.manual_seed(0)
    r, decoder = small(grid=4), nn.Conv2d(32, 3, 1)
    feats = torch.randn(2, 32, 8, 8)
    label = torch.randint(0, 3, (2, 32, 32))
    label[0, :5] = 255
    weight = torch.rand(2, 32, 32)
    keep = fixed_keep(r, monkeypatch, 2)
    loss, mask = mfm_loss(decoder, r, feats, label, weight, return_mask=True)

    with torch.no_grad():
        tokens = torch.where(keep.bool(), r.embed_tokens(feats), r.mask_token)
        offset = r.projectors[0](r.forward_transformer(tokens))  # (2, 32, 16, 16), resized to 8x8 below
        offset = F.interpolate(offset, size=(8, 8), mode="bilinear", align_corners=False)
        m = cells_to_pixels(keep, 8)
        logits = decoder(torch.where(m.bool(), feats, offset))
        logits = F.interpolate(logits, size=(32, 32), mode="bilinear", align_corners=False).double()
    logp = logits - logits.exp().sum(1, keepdim=True).log()
    valid = label != 255
    nll = -logp.gather(1, label.clamp(max=2)[:, None])[:, 0]
    expected = (nll * weight.double() * valid).sum() / label.numel()
    assert valid.any() and (~valid).any() and 0 < weight.min() < weight.max() < 1
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert torch.equal(mask, 1 - m)


def test_bad_arguments():
    with pytest.raises(ValueError, match="mask_ratio"):
        Rebuilder(mask_ratio=1.0)
    with pytest.raises(ValueError, match="num_heads"):
        Rebuilder(embed_dim=100, num_heads=16)
    with pytest.raises(ValueError, match="in_channels"):
        Rebuilder(in_channels=[8, 8, 8, 8, 8])
    with pytest.raises(ValueError, match="levels"):
        Rebuilder(in_channels=[8, 16], embed_dim=16, grid=2, num_heads=2)([torch.randn(1, 16, 2, 2)])


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


def test_rebuilder_takes_and_returns_a_dict_of_levels():
    """torchvision's backbones return an ordered dict, shallowest first: the Rebuilder gives back the same keys,
    and a dict gives exactly what the list of its values gives (same seed, same mask)."""
    rebuilder = Rebuilder([8, 16], embed_dim=32, grid=4, num_heads=4)
    low, high = torch.randn(2, 8, 8, 8), torch.randn(2, 16, 4, 4)
    torch.manual_seed(0)
    rebuilt, mask = rebuilder({"low": low, "high": high})
    torch.manual_seed(0)
    as_list, mask_list = rebuilder([low, high])
    assert list(rebuilt) == ["low", "high"]
    assert torch.equal(rebuilt["low"], as_list[0]) and torch.equal(rebuilt["high"], as_list[1])
    assert torch.equal(mask, mask_list)
    with pytest.raises(ValueError, match="2 levels"):
        rebuilder({"high": high})


def test_mfm_loss_takes_a_loss_fn_for_decoders_with_several_outputs():
    """loss_fn gets the decoder's output as it is (here a pair, as HRDA's), the pseudo-label and the weight; the
    Rebuilder and the mask are unchanged; None is the default upsample + weighted CE."""
    torch.manual_seed(0)
    r, conv = small(grid=4), nn.Conv2d(32, 3, 1)
    feats, label = torch.randn(2, 32, 8, 8), torch.randint(0, 3, (2, 32, 32))
    seen = {}

    def loss_fn(out, pseudo_label, weight):
        seen.update(out=out, pseudo_label=pseudo_label, weight=weight)
        return out[0].mean() + out[1].mean()

    torch.manual_seed(1)
    loss, mask = mfm_loss(lambda f: (conv(f), 2 * conv(f)), r, feats, label, 0.5, return_mask=True, loss_fn=loss_fn)
    assert seen["pseudo_label"] is label and seen["weight"] == 0.5 and len(seen["out"]) == 2
    assert loss.item() == pytest.approx(3 * seen["out"][0].mean().item(), rel=1e-5)
    torch.manual_seed(1)
    plain, plain_mask = mfm_loss(conv, r, feats, label, 0.5, return_mask=True, loss_fn=None)
    assert torch.equal(mask, plain_mask)
    logits = F.interpolate(seen["out"][0], size=(32, 32), mode="bilinear", align_corners=False)
    assert plain.item() == pytest.approx(weighted_cross_entropy(logits, label, 0.5).item(), rel=1e-6)
