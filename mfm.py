"""Masked Feature Modeling (MFM), arXiv 2509.13801: the method alone, torch only, copy this file.

During self-training, the last encoder feature map of a *target* image is masked in a grid of cells; a small
transformer, the Rebuilder, reconstructs the masked cells; the ordinary segmentation decoder classifies the
result and is trained against the teacher's pseudo-labels. The Rebuilder is dropped after training, so the
deployed network is unchanged. Paper symbols -> code:

    f      encoder feature E(x_t)                 feats, (B, C, h, w) (or a list of levels, last = deepest)
    M      random grid mask (1 = masked)          mask, returned by Rebuilder.forward
    R      Rebuilder                              Rebuilder (embed -> mask -> transformer -> projector -> fuse)
    f_rec  f on visible cells, R's output on M    first return value of Rebuilder.forward
    D      segmentation decoder                   any callable, e.g. model.decode
    L_mfm  CE(D(f_rec), pseudo-label) * q         mfm_loss

Adding it to a self-training loop (teacher pseudo-labels `pl`, confidence weight `q`, λ = 1):

    rebuilder = Rebuilder(in_channels=2048)                       # its own optimizer group, lr 2e-4
    feats = student.encode(x_tgt)                                 # the plain target crop, no mixing
    loss = lambda_mfm * mfm_loss(student.decode, rebuilder, feats, pl, q)
    loss.backward()                                               # reaches encoder, decoder and Rebuilder

A multi-level encoder (SegFormer / DAFormer MiT: 4 stages) passes its list of stages, shallowest first; only the
deepest is embedded and masked, every stage gets its own projector (scales 8, 4, 2, 1), and the decoder gets the
list back:

    rebuilder = Rebuilder(in_channels=[64, 128, 320, 512])        # 14,545,280 parameters
    loss = mfm_loss(daformer.decode, rebuilder, daformer.encode(x_tgt), pl, q)   # stages 128/64/32/16 at 512

A dict of levels (torchvision's backbones return one, e.g. LR-ASPP's {"low", "high"}) comes back as a dict with
the same keys, so such a head takes the rebuilt levels as it takes the backbone's:

    rebuilder = Rebuilder(in_channels=[40, 960])                  # lraspp_mobilenet_v3_large: strides 8, 16
    loss = mfm_loss(model.classifier, rebuilder, model.backbone(x_tgt), pl, q)

Defaults follow the paper (METHOD.md §3): C'=512, grid 16, depth 2, 16 heads, MLP ratio 4, mask ratio 0.4.
"""
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = 255  # mirrors data.IGNORE_INDEX; repeated so that this file stays standalone


def sincos_pos_embed(embed_dim, grid):
    """Fixed 2-D sine-cosine position embedding (MAE style, no class token) -> (grid*grid, embed_dim).
    Half of the channels encode the row, half the column; each half is [sin(p*w_i), cos(p*w_i)]."""
    if embed_dim % 4:
        raise ValueError(f"embed_dim must be divisible by 4 for the 2-D sin-cos embedding, got {embed_dim}")
    omega = 1.0 / 10000 ** (torch.arange(embed_dim // 4, dtype=torch.float64) / (embed_dim // 4))
    pos = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(pos, pos, indexing="ij")

    def embed_1d(p):  # (g*g,) -> (g*g, embed_dim/2)
        angles = p.reshape(-1, 1) * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([embed_1d(rows), embed_1d(cols)], dim=1).float()


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, H, W) map."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class Block(nn.Module):
    """Pre-norm transformer block: x += Attn(LN(x)); x += MLP(LN(x)). No dropout."""

    def __init__(self, dim, num_heads, mlp_ratio):
        super().__init__()
        self.num_heads = num_heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def attention(self, x):
        """(B, N, D) -> (B, N, D), multi-head self-attention."""
        B, N, D = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, nh, N, hs)
        return self.proj(out.transpose(1, 2).reshape(B, N, D))

    def forward(self, x):
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def projector(embed_dim, out_channels, scale=4):
    """Tokens as a (B, C', g, g) map -> offset (B, out_channels, scale*g, scale*g), the released stacks:
        s=8: ConvT(C'->C'/2) LN GELU ConvT(C'/2->C'/4) LN GELU ConvT(C'/4->C'/4) 1x1 LN
        s=4: ConvT(C'->C'/2) LN GELU ConvT(C'/2->C'/4) 1x1 LN      (the single-level projector)
        s=2: ConvT(C'->C'/2) 1x1 LN                                 (no LN/GELU after the only ConvT)
        s=1: 1x1 LN
    ConvT = stride-2 transposed conv (k4 p1); LN = channel LayerNorm, eps 1e-6; 1x1 maps to out_channels."""
    if scale not in (1, 2, 4, 8):
        raise ValueError(f"projector scale must be 1, 2, 4 or 8 (the released stacks), got {scale}")
    layers, c = [], embed_dim
    for i in range(scale.bit_length() - 1):  # log2(scale) ConvTs; LN + GELU between two, none after the last
        if i:
            layers += [LayerNorm2d(c, eps=1e-6), nn.GELU()]
        layers.append(nn.ConvTranspose2d(c, c // 2 if i < 2 else c, 4, stride=2, padding=1))
        c = layers[-1].out_channels
    return nn.Sequential(*layers, nn.Conv2d(c, out_channels, 1), LayerNorm2d(out_channels, eps=1e-6))


class Rebuilder(nn.Module):
    """Reconstructs the masked grid cells of an encoder feature map (training only).

    in_channels: C of the feature map (one projector, scale 4), or one C per level, shallowest first, for
    multi-level encoders (SegFormer/DAFormer, up to 4 levels): then forward takes a list of maps, embeds and
    masks only the last one, and level l of L gets its own projector of scale s_l = 2**(L-1-l) (8, 4, 2, 1 for
    the four MiT stages: 128/64/32/16 at a 512 crop with g=16). One keep-mask serves every level.
    *choice* for crops other than 512 (the release hard-codes 512): an offset whose size s_l*g differs from its
    level's is resized bilinearly (align_corners=False) to that level's size, as in the single-level path.
    """

    def __init__(self, in_channels=2048, embed_dim=512, grid=16, depth=2, num_heads=16, mlp_ratio=4.0,
                 mask_ratio=0.4):
        super().__init__()
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must lie in (0, 1), got {mask_ratio}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.multi_level = not isinstance(in_channels, int)
        channels = list(in_channels) if self.multi_level else [in_channels]
        if not 1 <= len(channels) <= 4:
            raise ValueError(f"in_channels: 1 to 4 levels (released projector scales 8, 4, 2, 1), got {in_channels}")
        self.scales = [2 ** i for i in reversed(range(len(channels)))] if self.multi_level else [4]
        self.grid, self.mask_ratio = grid, mask_ratio
        self.embed = nn.Linear(channels[-1], embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim, 1, 1))
        self.register_buffer("pos_embed", sincos_pos_embed(embed_dim, grid).unsqueeze(0), persistent=False)
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim)
        self.projectors = nn.ModuleList(projector(embed_dim, c, s) for c, s in zip(channels, self.scales))
        self.reset_parameters()

    def reset_parameters(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):  # transformer and embedding init (MAE); convs keep PyTorch's (choice)
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.mask_token, std=0.02)

    def random_masking(self, batch, device):
        """keep (B, 1, g, g): 1 = visible, Bernoulli(1 - mask_ratio) per sample and cell, new every call."""
        return (torch.rand(batch, 1, self.grid, self.grid, device=device) >= self.mask_ratio).float()

    def embed_tokens(self, feats):
        """(B, C, h, w) -> (B, C', g, g). The paper embeds per position, then resizes bilinearly; both are
        linear and the resize weights sum to 1, so resizing first gives the same result at (g/h)^2 the cost."""
        if feats.shape[-2:] != (self.grid, self.grid):  # a MiT last stage at a 512 crop is already 16 x 16
            feats = F.interpolate(feats, size=(self.grid, self.grid), mode="bilinear", align_corners=False)
        return self.embed(feats.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def forward_transformer(self, x):
        """(B, C', g, g) -> (B, C', g, g): tokens + position embedding through the blocks and the final norm."""
        B, D, g, _ = x.shape
        tokens = x.flatten(2).transpose(1, 2) + self.pos_embed  # (B, g*g, C')
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens).transpose(1, 2).reshape(B, D, g, g)

    def forward(self, feats):
        """feats (B, C, h, w) [or a list of levels, or a dict of them in that order: a torchvision backbone's
        output] -> (f_rec like feats, mask (B, 1, h, w) of the last level, 1 = masked). Visible positions are
        the input features themselves (gradient included)."""
        named = isinstance(feats, Mapping)
        levels = list(feats.values()) if named else list(feats) if self.multi_level else [feats]
        if len(levels) != len(self.projectors):
            raise ValueError(f"Rebuilder was built for {len(self.projectors)} levels (in_channels), got {len(levels)}")
        last = levels[-1]
        keep = self.random_masking(last.shape[0], last.device)
        x = self.embed_tokens(last)
        keep_x = keep.to(x.dtype)
        x = x * keep_x + self.mask_token.to(x.dtype) * (1 - keep_x)
        x = self.forward_transformer(x)
        rebuilt = []
        for f, proj in zip(levels, self.projectors):
            offset = proj(x)  # (B, C_l, s_l*g, s_l*g)
            if offset.shape[-2:] != f.shape[-2:]:  # s_l*g == h_l for 512 crops; otherwise resize (choice)
                offset = F.interpolate(offset, size=f.shape[-2:], mode="bilinear", align_corners=False)
            m = F.interpolate(keep, size=f.shape[-2:], mode="nearest").to(f.dtype)
            rebuilt.append(f * m + offset.to(f.dtype) * (1 - m))
        mask = 1 - F.interpolate(keep, size=last.shape[-2:], mode="nearest")
        if named:
            return dict(zip(feats, rebuilt)), mask
        return (rebuilt if self.multi_level else rebuilt[0]), mask


def weighted_cross_entropy(logits, label, weight=1.0, ignore_index=IGNORE_INDEX):
    """Pixel-wise CE times a confidence weight, averaged over all pixels (ignored ones count 0, as mmseg).
    logits (B, K, H, W) at label size, label (B, H, W) int64, weight a scalar or (B, H, W)."""
    ce = F.cross_entropy(logits.float(), label, ignore_index=ignore_index, reduction="none")
    return (ce * weight).mean()


def mfm_loss(decoder, rebuilder, feats, pseudo_label, weight=1.0, ignore_index=IGNORE_INDEX, return_mask=False,
             loss_fn=None):
    """L_mfm = CE(D(R(f)) upsampled to label size, pseudo-label) * confidence weight.

    decoder: callable, features -> logits (B, K, h, w); feats: (B, C, h, w) or a list (or dict) of levels;
    pseudo_label: (B, H, W) int64; weight: scalar or (B, H, W). λ is applied by the caller.
    loss_fn: callable (decoder output, pseudo_label, weight) -> scalar, replacing upsample + CE (for frameworks
    such as HRDA whose decoder returns more than one map); None = bilinear upsample + weighted CE (ignore_index).
    Returns the loss, or (loss, mask (B, 1, h, w)) with return_mask=True.
    """
    rebuilt, mask = rebuilder(feats)
    out = decoder(rebuilt)
    if loss_fn is not None:
        loss = loss_fn(out, pseudo_label, weight)
    else:
        if out.shape[-2:] != pseudo_label.shape[-2:]:
            out = F.interpolate(out, size=pseudo_label.shape[-2:], mode="bilinear", align_corners=False)
        loss = weighted_cross_entropy(out, pseudo_label, weight, ignore_index)
    return (loss, mask) if return_mask else loss


if __name__ == "__main__":
    r = Rebuilder()
    print(f"Rebuilder with the paper's defaults: {sum(p.numel() for p in r.parameters()):,d} parameters")
    f_rec, mask = r(torch.randn(2, 2048, 64, 64))
    print(f"f (2, 2048, 64, 64) -> f_rec {tuple(f_rec.shape)}; masked fraction {mask.mean().item():.2f} "
          f"of a {r.grid}x{r.grid} grid (expected {r.mask_ratio})")
