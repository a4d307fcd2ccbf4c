"""The network as CPU inference runs it: the same function as the trained module, computed faster.

`inference_form(model)` returns a copy of a DeepEM3DNet in eval mode with five changes that
leave its outputs equal up to float32 rounding (the sums run in another order; tested to 1e-5 of
the logits' scale):

- every BatchNorm folded into the convolution (or the sum of deconvolutions) before it: in eval
  mode a BatchNorm is a per-channel affine map with constant coefficients;
- the 3D part (conv1_1 then conv1_2, which collapses the sections) as two 2D convolutions with
  the sections as channels: torch runs these 3D shapes on its slow reference path, oneDNN runs
  the 2D ones on its blocked kernels;
- each side output's transposed convolutions as matrix products over bands of input rows, each
  tap's plane added, shifted, into its output phase (for inputs under 448 x 448 px, on other
  devices and under autocast: a matrix product and a col2im per dilation);
- each residual block's x + 0.1 branch(x) as the branch's last convolution with the 0.1 in its
  weights, x and the ReLU added in place: two fewer tensors of the block's size per block
  (a 2528 px tile, small preset, 2 threads: 750-784 -> 694-704 ns per pixel);
- the 2D part's weights and activations channels-last, oneDNN's native layout.

Measured on this project's 2-core CPU by `python benchmarks/inference_form.py` (torch 2.13,
tiny preset, one thread): 2.0-2.2x faster per pixel than the module as trained on 512 px
patches in batches of 4, 3.0x on a 2528 px tile (689 ns per pixel; 1,075 with a matrix product
and a col2im per dilation over the whole tile, whose fresh 200 MiB of columns per dilation cost
more in page faults than in arithmetic); `python benchmarks/inference.py` runs the tasks with it.
The module as trained stays what training, checkpoints and the receptive-field arithmetic see;
only predictors on the CPU take this form (`ModelPredictor`), so every task of a run computes
with the same one.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from deepem3d.models.network import (
    RESIDUAL_SCALE,
    ConvBN,
    DeepEM3DNet,
    InceptionResNet,
    SideOutput,
)

__all__ = ["inference_form"]


def _bn_affine(bn: nn.BatchNorm2d | nn.BatchNorm3d) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) of an eval-mode BatchNorm: bn(y) = scale * y + shift per channel."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return scale, bn.bias - bn.running_mean * scale


def _fold(block: ConvBN) -> nn.Module:
    """conv + BN (+ ReLU) -> one conv with the BN in its weights and bias (+ ReLU in place)."""
    conv = copy.deepcopy(block.conv)
    scale, shift = _bn_affine(block.bn)
    conv.weight.copy_(conv.weight * scale.reshape(-1, *[1] * (conv.weight.dim() - 1)))
    conv.bias.copy_(conv.bias * scale + shift)
    if isinstance(block.relu, nn.ReLU):
        return nn.Sequential(conv, nn.ReLU(inplace=True))
    return conv


class _SectionsAsChannels(nn.Module):
    """conv1_1 and conv1_2 (3D, BatchNorm and ReLU after each) as two 2D convolutions over the
    sections as channels: (N, 1, Z, Y, X) -> (N, C, 1, Y/2, X/2), what conv1_2 returns."""

    def __init__(self, first: ConvBN, second: ConvBN, sections: int) -> None:
        super().__init__()
        w1, w2 = first.conv.weight, second.conv.weight  # (C1, 1, kz, 3, 3), (C2, C1, kz, 3, 3)
        (sz, sy, sx), (pz, py, px) = first.conv.stride, first.conv.padding
        c1, kz = w1.shape[0], w1.shape[2]
        depth = (sections + 2 * pz - kz) // sz + 1  # conv1_1's output sections
        if depth != w2.shape[2] or second.conv.padding[0] != 0 or second.conv.stride[0] != 1:
            raise ValueError(f"conv1_2 does not collapse conv1_1's {depth} sections to one")
        scale1, shift1 = _bn_affine(first.bn)
        # channel (c, k) of the first conv: conv1_1's channel c at output section k, which sees
        # input sections sz * k - pz + t for its taps t (outside 0..Z-1: zero padding)
        weight = w1.new_zeros(c1, depth, sections, 3, 3)
        for k in range(depth):
            for t in range(kz):
                s = sz * k - pz + t
                if 0 <= s < sections:
                    weight[:, k, s] = w1[:, 0, t]
        # on the trained convs' device and dtype (a model already moved to the GPU: default
        # ones would sit on the CPU and every forward fail)
        like = {"device": w1.device, "dtype": w1.dtype}
        self.first = nn.Conv2d(sections, c1 * depth, 3, stride=(sy, sx), padding=(py, px),
                               **like)
        self.first.weight.copy_((weight * scale1.reshape(-1, 1, 1, 1, 1)).reshape(
            c1 * depth, sections, 3, 3))
        self.first.bias.copy_((first.conv.bias * scale1 + shift1).repeat_interleave(depth))
        scale2, shift2 = _bn_affine(second.bn)
        self.second = nn.Conv2d(c1 * depth, w2.shape[0], 3, padding=second.conv.padding[1:],
                                **like)
        self.second.weight.copy_((w2 * scale2.reshape(-1, 1, 1, 1, 1)).reshape(
            w2.shape[0], c1 * depth, 3, 3))
        self.second.bias.copy_(second.conv.bias * scale2 + shift2)
        self.relu_first = isinstance(first.relu, nn.ReLU)
        self.relu_second = isinstance(second.relu, nn.ReLU)

    @property
    def conv(self) -> nn.Conv2d:
        """The first convolution (what `DeepEM3DNet.normalize` reads the dtype from)."""
        return self.first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        planes = x[:, 0].contiguous(memory_format=torch.channels_last)
        y = self.first(planes)
        if self.relu_first:
            y = F.relu(y, inplace=True)
        y = self.second(y)
        if self.relu_second:
            y = F.relu(y, inplace=True)
        return y.unsqueeze(2)


class _SideByBands(nn.Module):
    """A side output's summed deconvolutions (the BatchNorm after them folded in) as matrix
    products and shifted adds, then ReLU and its 3x3 conv.

    A kernel-2s, stride-s deconvolution sends input pixel i, through tap k, to output pixel
    i s + k d - p (per axis), that is to output phase r and coarse row i + q where
    k d - p + top s = q s + r. Per band of input rows, one matrix product gives every tap's
    value (8 floats per output pixel per dilation) into a buffer reused across bands, and each
    tap's plane is added to its phase's plane of an accumulator, shifted by q: contiguous rows,
    no scatter. The accumulator's phases are interleaved into the output at the end. torch's
    CPU transposed convolution is slow for these shapes (2 output channels); a matrix product
    and a col2im per dilation over the whole tile wrote and re-read 200 MiB of columns per
    dilation on a 2528 px tile.

    A voxel's floats do not depend on where a tile cuts the volume: each output pixel gets its
    taps in one fixed order (dilation, then input row, then tap along x), within a band or
    across two, and every product has the same number of columns (the last band overlaps the
    one before it), since MKL rounds a product of the full preset's widths differently below
    about 200 columns. Inputs whose output is under `BANDS_FROM` pixels take one matrix product
    and col2im per dilation instead: there the accumulator's margins and the small adds cost
    more than the columns.
    """

    PLANE = 1 << 14  # elements per shifted add, at least: a few µs of work against torch's call
    # output pixels: `python benchmarks/inference_form.py --shapes 4x320 4x384 4x448 4x512`, one
    # thread, whole form with the sides by bands against by col2im: 676/648, 644/622, 572/682,
    # 589/830 ns per pixel (tiny preset); 1108/1091, 1136/1123, 958/1021, 957/1119 (small)
    BANDS_FROM = 448 * 448

    def __init__(self, side: SideOutput) -> None:
        super().__init__()
        deconvs = [side.deconv, *side.dilated]
        scale, shift = _bn_affine(side.bn)
        cin, cout, k, _ = deconvs[0].weight.shape
        weights = [(d.weight * scale.reshape(1, -1, 1, 1)).reshape(cin, cout * k * k).t()
                   for d in deconvs]
        self.register_buffer("weight", torch.stack(weights).contiguous())
        self.register_buffer("bias", sum(d.bias for d in deconvs) * scale + shift)
        self.scale, self.kernel, self.channels = side.scale, k, cout
        s = side.scale
        pad = max(d.padding[0] for d in deconvs)
        self.top = -(-pad // s)  # coarse rows of the accumulator above output row 0
        # per dilation, (tap, phase, shift) along an axis; taps in descending order, so that
        # an output pixel's upper input row comes first, within a band or across two
        self.taps = [[(t, *reversed(divmod(t * d.dilation[0] - d.padding[0] + self.top * s, s)))
                      for t in range(k - 1, -1, -1)] for d in deconvs]
        self.reach = max(q for taps in self.taps for _, _, q in taps)
        self.deconvs = [(d.dilation[0], d.padding[0]) for d in deconvs]  # (dilation, padding)
        self.conv = side.conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        s, k, o = self.scale, self.kernel, self.channels
        if (x.device.type != "cpu"  # a few large kernels there, not thousands of small adds
                or torch.is_autocast_enabled(x.device.type)  # products in another dtype
                or h * w * s * s < self.BANDS_FROM):
            return self._forward_by_fold(x)
        band = max(1, min(h, -(-self.PLANE // (o * w))))
        columns = x.new_empty(o * k * k, band * w)
        planes = columns.view(o, k, k, band, w)
        out = torch.empty(n, o, h * s, w * s, dtype=x.dtype, device=x.device,
                          memory_format=torch.channels_last)
        acc = x.new_empty(o, s, s, h + self.reach, w + self.reach)  # reused: fresh pages cost
        top = self.top
        for item, target in zip(x, out, strict=True):
            acc.zero_()
            for weight, taps in zip(self.weight, self.taps, strict=True):
                for i0 in range(0, h, band):
                    start = min(i0, h - band)  # the last band ends at the last row
                    rows, skip = min(band, h - i0), i0 - start
                    torch.matmul(weight, item[:, start:start + band].reshape(c, band * w),
                                 out=columns)
                    for ky, ry, qy in taps:
                        for kx, rx, qx in reversed(taps):
                            acc[:, ry, rx, i0 + qy:i0 + qy + rows, qx:qx + w].add_(
                                planes[:, ky, kx, skip:skip + rows])
            target.view(o, h, s, w, s).copy_(
                acc[:, :, :, top:top + h, top:top + w].permute(0, 3, 1, 4, 2))
        out.add_(self.bias.reshape(1, -1, 1, 1)).relu_()
        return self.conv(out)

    def _forward_by_fold(self, x: torch.Tensor) -> torch.Tensor:
        """The same sum as a matrix product and a col2im (`F.fold`) per dilation over the
        whole input: a few large kernels, what a GPU runs well."""
        n, c, h, w = x.shape
        x = x.reshape(n, c, h * w)
        out = None
        for weight, (dilation, padding) in zip(self.weight, self.deconvs, strict=True):
            part = F.fold(torch.matmul(weight, x), (h * self.scale, w * self.scale),
                          self.kernel, dilation=dilation, padding=padding, stride=self.scale)
            out = part if out is None else out.add_(part)
        out = F.relu(out.add_(self.bias.reshape(1, -1, 1, 1)), inplace=True)
        return self.conv(out.contiguous(memory_format=torch.channels_last))


class _ResidualInPlace(nn.Module):
    """relu(x + 0.1 top(concat(x))) with the 0.1 folded into top's weights and bias, the sum
    and the ReLU written into top's output."""

    def __init__(self, block: InceptionResNet) -> None:
        super().__init__()
        self.concat = block.concat
        self.top_conv_1x1 = _fold(block.top_conv_1x1)  # a Conv2d: the block's ConvBN has no ReLU
        self.top_conv_1x1.weight.mul_(RESIDUAL_SCALE)
        self.top_conv_1x1.bias.mul_(RESIDUAL_SCALE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.top_conv_1x1(self.concat(x)).add_(x).relu_()


@torch.no_grad()
def inference_form(model: DeepEM3DNet) -> DeepEM3DNet:
    """A copy of `model` for CPU inference: BatchNorms folded, the 3D part as 2D convolutions,
    channels-last (the module docstring says why each keeps the function)."""
    form = copy.deepcopy(model).eval()
    form.conv1_1 = _SectionsAsChannels(model.conv1_1, model.conv1_2, model.in_sections)
    form.conv1_2 = nn.Identity()  # conv1_1's stand-in does both convolutions
    for name in ("side_2x", "side_4x", "side_8x", "side_16x"):
        setattr(form, name, _SideByBands(getattr(form, name)))
    for name in ("ira_A", "ira_B", "ira_C"):
        setattr(form, name, _ResidualInPlace(getattr(form, name)))
    parents = [m for m in form.modules() if not isinstance(m, _SectionsAsChannels)]
    for parent in parents:
        for name, child in list(parent.named_children()):
            if isinstance(child, ConvBN):
                setattr(parent, name, _fold(child))
    for module in form.modules():
        if isinstance(module, nn.Conv2d | nn.ConvTranspose2d):
            module.weight.data = module.weight.data.contiguous(memory_format=torch.channels_last)
    return form.requires_grad_(False)
