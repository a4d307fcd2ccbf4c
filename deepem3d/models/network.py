"""The DeepEM3D network (Zeng, Wu, Ji, Bioinformatics 2017) in PyTorch.

A 3D stem turns a stack of `in_sections` EM sections into one 2D feature map at half resolution;
an Inception-ResNet-v2 style encoder goes down to 1/16; four side outputs (at 1/2, 1/4, 1/8
and 1/16, the first three each a plain deconv plus four dilated deconvs) are brought back to
full resolution and summed into the logits of the middle section. The source is the authors'
Caffe definition ("the table": its list of layers), described layer by layer in docs/network.md.

Readings of the table (where it is ambiguous):
- Kernel/pad axis order. The table lists Caffe ND kernels as x,y,z; the 3D part confirms it
  (conv1_2 pad "1,1,0": no z pad, which is what collapses 3 z positions to 1). In-plane pairs
  are kept as listed and read the same way, "AxB" = A along x, B along y, so the table's "7x1"
  is a PyTorch (kH, kW) = (1, 7) kernel. The in-plane orientation of the released data is not
  recoverable from the table anyway, and the network is trained and tested under the 8
  in-plane rotations/flips, so the other reading is the same network rotated by 90 degrees.
- Layer names disagree with their kernels in places: conv2_1x7 has kernel "7x1" and conv2_7x1
  "1x7" (swapped names), while ira_Inception_B b_conv1x7_1 is "1x7" (matching). Inception-C's
  b_conv1x7_1/b_conv7x1_1 are 1x3/3x1 kernels (names copied from block B). Modules keep the
  Caffe names, except those two, named b_conv1x3_1/b_conv3x1_1 after their kernels.
- The sums fc1_2x/fc1_4x/fc1_8x name their inputs deconv2_2x_c0... while the layers are named
  fc1_2x_c0...; they are the same five deconvs per scale.
- Biases. Counting a bias on every conv and deconv gives exactly the table's 24,014,188; so every
  conv keeps its bias even where BatchNorm follows (redundant there: BN's mean removes it).
  BatchNorm affine parameters: every conv's BN (13,020 channels) plus the BN on each of the four
  summed side outputs (4 x 2) = 13,028 channels x 2 = 26,056. Full preset: 24,040,244.
- Each side output ends in BN + ReLU before the four are summed (faithful), so the boundary
  logits are non-negative sums; softmax needs only their difference. The affinity head
  (sigmoid, not in the paper) drops that last ReLU, or its probabilities could not go below 0.5.
- Max pools use ceil_mode (Caffe rounds up); with pad 0 their output size equals that of the
  stride-2 pad-1 convs beside them for every even size, which is why in-plane sizes must be
  multiples of 16. The two are not centred alike: pool output i covers inputs 2i..2i+2, the
  conv's 2i-1..2i+1, so each reduction concatenates features one pixel (of the map it
  reduces) apart (faithful; it makes the receptive field slightly asymmetric: [-230, +225]).
- BatchNorm uses PyTorch's defaults (eps 1e-5 as Caffe; running-average momentum 0.1 where
  Caffe's moving_average_fraction 0.999 is 0.001): short CPU runs need the faster average.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction

import torch
from torch import nn

from deepem3d.models.presets import DILATIONS, PRESETS, WIDTH_TABLE, preset_widths

HEADS: tuple[str, ...] = ("boundary", "affinity")
SECTIONS: tuple[int, ...] = (1, 3, 5)
DIVISOR = 16
# Raw uint8 intensities are mapped to [-1, 1] by a fixed affine map, not by per-patch statistics:
# a voxel's input must not depend on which chunk or patch it was read in (seam-free inference).
# (The authors fed raw 0..255; BatchNorm after conv1_1 absorbs the scale, and zero padding then
# means mid-grey rather than black.)
INPUT_MEAN = 127.5
INPUT_STD = 127.5
RESIDUAL_SCALE = 0.1  # conv3_sum/conv4_sum/conv5_sum: x + 0.1 * branch (Caffe Eltwise coeff)


def _xy(x: int, y: int) -> tuple[int, int]:
    """A table pair listed as (x, y) as PyTorch's (y, x) order."""
    return (y, x)


def _deconv_padding(scale: int, dilation: int) -> int:
    """Padding that makes a kernel-2s, stride-s deconv output exactly s times its input.

    Reproduces every pad in the table: e.g. (s=2, d=5) -> 7, (s=8, d=23) -> 169, (s=16) -> 8.
    """
    return (dilation * (2 * scale - 1) + 1 - scale) // 2


# ---------------------------------------------------------------------------------------------
# Receptive field arithmetic: one axis, exact for these layers (no cancellation assumed).


@dataclass(frozen=True)
class Span:
    """Input pixels a feature depends on, along one axis: feature i of a map whose pixels are
    `jump` input pixels apart sees input pixels [jump * i + lo, jump * i + hi]."""

    jump: Fraction = Fraction(1)
    lo: Fraction = Fraction(0)
    hi: Fraction = Fraction(0)

    def conv(self, kernel: int, stride: int, padding: int, dilation: int = 1) -> Span:
        return Span(
            self.jump * stride,
            self.lo - self.jump * padding,
            self.hi + self.jump * ((kernel - 1) * dilation - padding),
        )

    def deconv(self, kernel: int, stride: int, padding: int, dilation: int = 1) -> Span:
        """Worst case over output phases: output o takes input i where o = i*s - p + m*d."""
        step = self.jump / stride
        los, his = [], []
        for phase in range(stride):
            taps = [
                (phase + padding - m * dilation) // stride
                for m in range(kernel)
                if (phase + padding - m * dilation) % stride == 0
            ]
            los.append(self.jump * min(taps) + self.lo - step * phase)
            his.append(self.jump * max(taps) + self.hi - step * phase)
        return Span(step, min(los), max(his))

    def union(self, other: Span) -> Span:
        assert self.jump == other.jump, "branches of one concat/sum share a resolution"
        return Span(self.jump, min(self.lo, other.lo), max(self.hi, other.hi))

    @property
    def half_width(self) -> int:
        return math.ceil(max(-self.lo, self.hi))


Spans = tuple[Span, ...]  # one per spatial axis of the module, in PyTorch order ((z,) y, x)


def _union(spans: Sequence[Spans]) -> Spans:
    out = spans[0]
    for other in spans[1:]:
        out = tuple(a.union(b) for a, b in zip(out, other))
    return out


def _module_spans(module: nn.Module, spans: Spans) -> Spans:
    """Propagate spans through one module (conv, deconv, pool, or one of ours)."""
    if hasattr(module, "spans"):
        return module.spans(spans)
    if isinstance(module, nn.Sequential):
        for child in module:
            spans = _module_spans(child, spans)
        return spans
    if isinstance(module, (nn.Conv2d, nn.Conv3d, nn.MaxPool2d, nn.ConvTranspose2d)):
        n = len(spans)

        def per_axis(v: int | Sequence[int]) -> tuple[int, ...]:
            return tuple(v) if isinstance(v, Sequence) else (v,) * n

        ks, ss, ps = per_axis(module.kernel_size), per_axis(module.stride), per_axis(module.padding)
        ds = per_axis(module.dilation)
        op = Span.deconv if isinstance(module, nn.ConvTranspose2d) else Span.conv
        return tuple(op(sp, k, s, p, d) for sp, k, s, p, d in zip(spans, ks, ss, ps, ds))
    if isinstance(module, (nn.ReLU, nn.Identity, nn.BatchNorm2d, nn.BatchNorm3d)):
        return spans
    raise TypeError(f"no receptive-field rule for {type(module).__name__}")


# ---------------------------------------------------------------------------------------------
# Building blocks


class ConvBN(nn.Module):
    """Conv (with bias) + BatchNorm (Caffe BatchNorm + Scale) + optional ReLU."""

    def __init__(
        self, cin: int, cout: int, kernel: int | tuple[int, ...], *, stride: int | tuple = 1,
        padding: int | tuple = 0, relu: bool = True, dims: int = 2,
    ) -> None:
        super().__init__()
        conv, bn = (nn.Conv3d, nn.BatchNorm3d) if dims == 3 else (nn.Conv2d, nn.BatchNorm2d)
        self.conv = conv(cin, cout, kernel, stride=stride, padding=padding)
        self.bn = bn(cout)
        self.relu = nn.ReLU() if relu else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)))

    def spans(self, spans: Spans) -> Spans:
        return _module_spans(self.conv, spans)


Branch = Sequence[tuple[str, nn.Module]]


class Concat(nn.Module):
    """Parallel branches concatenated along channels in the table's order (Caffe Concat)."""

    def __init__(self, branches: Mapping[str, Branch]) -> None:
        super().__init__()
        self.branches = nn.ModuleDict(
            {name: nn.Sequential(OrderedDict(layers)) for name, layers in branches.items()}
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([branch(x) for branch in self.branches.values()], dim=1)

    def spans(self, spans: Spans) -> Spans:
        return _union([_module_spans(b, spans) for b in self.branches.values()])


class InceptionResNet(nn.Module):
    """relu(x + 0.1 * top_conv_1x1(concat(branches(x)))): the residual Inception blocks."""

    def __init__(self, branches: Mapping[str, Branch], concat: int, channels: int) -> None:
        super().__init__()
        self.concat = Concat(branches)
        self.top_conv_1x1 = ConvBN(concat, channels, 1, relu=False)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(x + RESIDUAL_SCALE * self.top_conv_1x1(self.concat(x)))

    def spans(self, spans: Spans) -> Spans:
        return _union([spans, self.top_conv_1x1.spans(self.concat.spans(spans))])


class SideOutput(nn.Module):
    """One decoder scale: deconvs summed -> BN + ReLU -> 3x3 conv -> BN (+ ReLU).

    The plain deconv has kernel 2s, stride s; the dilated ones (same kernel and stride) look
    further out at no extra resolution cost: this is where the large receptive field comes from.
    """

    def __init__(
        self, cin: int, scale: int, dilations: Sequence[int], side: int, out: int,
        final_relu: bool,
    ) -> None:
        super().__init__()
        self.scale = scale

        def deconv(d: int) -> nn.ConvTranspose2d:
            pad = _deconv_padding(scale, d)
            return nn.ConvTranspose2d(cin, side, 2 * scale, stride=scale, padding=pad, dilation=d)

        self.deconv = deconv(1)
        self.dilated = nn.ModuleList(deconv(d) for d in dilations)
        self.bn = nn.BatchNorm2d(side)
        self.relu = nn.ReLU()
        self.conv = ConvBN(side, out, 3, padding=1, relu=final_relu)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.deconv(x)
        for layer in self.dilated:
            y = y + layer(x)
        return self.conv(self.relu(self.bn(y)))

    def spans(self, spans: Spans) -> Spans:
        up = _union([_module_spans(d, spans) for d in [self.deconv, *self.dilated]])
        return self.conv.spans(up)


# ---------------------------------------------------------------------------------------------
# The network


class DeepEM3DNet(nn.Module):
    """DeepEM3D: (N, 1, in_sections, Y, X) normalised input -> (N, C, Y, X) middle-section logits.

    C = 2 for the boundary head (channel 0 interior, channel 1 boundary; softmax) and 3 for the
    affinity head (channels x, y, z in CloudVolume order: affinity of voxel v with v - e_c;
    sigmoid). Build it with `build_model`; `config` rebuilds it.
    """

    divisor: int = DIVISOR

    def __init__(
        self, preset: str = "small", head: str = "boundary", in_sections: int = 5, *,
        input_mean: float = INPUT_MEAN, input_std: float = INPUT_STD,
        widths: Mapping[str, int] | None = None,
    ) -> None:
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"unknown head {head!r}: choose one of {', '.join(HEADS)}")
        if isinstance(in_sections, bool) or in_sections not in SECTIONS:
            raise ValueError(
                f"in_sections must be one of {', '.join(map(str, SECTIONS))}, got {in_sections!r}"
            )
        if widths is None:
            w = preset_widths(preset)
        else:
            missing = sorted(set(WIDTH_TABLE) - set(widths))
            if missing:
                raise ValueError(f"widths lack {', '.join(missing)}: give every layer of "
                                 "presets.WIDTH_TABLE")
            w = {k: int(widths[k]) for k in WIDTH_TABLE}
        if not input_std > 0:
            raise ValueError(f"input_std must be positive, got {input_std}")
        self.preset, self.head, self.in_sections = preset, head, int(in_sections)
        self.widths = w
        self._custom_widths = widths is not None
        self.out_channels = 2 if head == "boundary" else 3
        self.register_buffer("input_mean", torch.tensor(float(input_mean)))
        self.register_buffer("input_std", torch.tensor(float(input_std)))

        # 3D part. 5 sections: z stride 2, pad 1 (5 -> 3), then z kernel 3, no pad (3 -> 1).
        # 3 sections (our reading; the released "3-section" folder holds the 5-section net):
        # z stride 1, pad 1 (3 -> 3), then the same conv1_2 (3 -> 1); same weight shapes.
        # 1 section (released 1fm variant): 3x3x1 kernels, z stride 1, no z pad.
        kz = 1 if in_sections == 1 else 3
        self.conv1_1 = ConvBN(
            1, w["conv1_1"], (kz, 3, 3), stride=(2 if in_sections == 5 else 1, 2, 2),
            padding=(1 if in_sections > 1 else 0, 1, 1), dims=3,
        )
        self.conv1_2 = ConvBN(w["conv1_1"], w["conv1_2"], (kz, 3, 3), padding=(0, 1, 1), dims=3)

        def cbn(cin: int, key: str, kernel: int | tuple[int, int], stride: int = 1,
                padding: int | tuple[int, int] = 0, relu: bool = True) -> tuple[str, ConvBN]:
            name = key.rsplit("/", 1)[-1]
            return name, ConvBN(cin, w[key], kernel, stride=stride, padding=padding, relu=relu)

        def pool(name: str) -> tuple[str, nn.Module]:
            return name, nn.MaxPool2d(3, stride=2, padding=0, ceil_mode=True)

        c = w["conv1_2"]
        # Stem at 1/2 -> concat_stem_1 (the 2x side output's input).
        self.stem = Concat({
            "a": [cbn(c, "conv2_1b", 1), cbn(w["conv2_1b"], "conv2_1b_3x3", 3, padding=1,
                                             relu=False)],
            "b": [cbn(c, "conv2_1x1", 1),
                  cbn(w["conv2_1x1"], "conv2_1x7", _xy(7, 1), padding=_xy(3, 0)),
                  cbn(w["conv2_1x7"], "conv2_7x1", _xy(1, 7), padding=_xy(0, 3)),
                  cbn(w["conv2_7x1"], "conv2_3x3", 3, padding=1)],
        })
        c_half = w["conv2_1b_3x3"] + w["conv2_3x3"]
        self.stem_reduction = Concat({
            "pool": [pool("pool_stem_concat")],
            "conv": [cbn(c_half, "stem_concat_conv_3x3", 3, stride=2, padding=1)],
        })
        # 1/4: Inception-ResNet-A on the conv3_1b trunk -> conv3_sum.
        self.conv3_1b = ConvBN(c_half + w["stem_concat_conv_3x3"], w["conv3_1b"], 1)
        c_quarter = w["conv3_1b"]
        self.ira_A = InceptionResNet({
            "1": [cbn(c_quarter, "ira_A_1_conv1x1", 1)],
            "2": [cbn(c_quarter, "ira_A_2_conv1x1", 1),
                  cbn(w["ira_A_2_conv1x1"], "ira_A_2_conv3x3", 3, padding=1)],
            "3": [cbn(c_quarter, "ira_A_3_conv1x1", 1),
                  cbn(w["ira_A_3_conv1x1"], "ira_A_3_conv3x3_1", 3, padding=1),
                  cbn(w["ira_A_3_conv3x3_1"], "ira_A_3_conv3x3_2", 3, padding=1)],
        }, w["ira_A_1_conv1x1"] + w["ira_A_2_conv3x3"] + w["ira_A_3_conv3x3_2"], c_quarter)
        self.reduction_A = Concat({
            "pool": [pool("pool")],
            "b": [cbn(c_quarter, "reduction_A/conv3x3_reduction_b", 3, stride=2, padding=1)],
            "c": [cbn(c_quarter, "reduction_A/conv1x1_c", 1),
                  cbn(w["reduction_A/conv1x1_c"], "reduction_A/conv3x3_c", 3, padding=1),
                  cbn(w["reduction_A/conv3x3_c"], "reduction_A/conv3x3_reduction_c", 3,
                      stride=2, padding=1)],
        })
        c = c_quarter + w["reduction_A/conv3x3_reduction_b"] + w["reduction_A/conv3x3_reduction_c"]
        # 1/8: Inception-ResNet-B on the conv4_1b trunk -> conv4_sum.
        self.conv4_1b = ConvBN(c, w["conv4_1b"], 1)
        c_eighth = w["conv4_1b"]
        self.ira_B = InceptionResNet({
            "a": [cbn(c_eighth, "ira_B/a_conv1x1_1", 1)],
            "b": [cbn(c_eighth, "ira_B/b_conv1x1_1", 1),
                  cbn(w["ira_B/b_conv1x1_1"], "ira_B/b_conv1x7_1", _xy(1, 7), padding=_xy(0, 3)),
                  cbn(w["ira_B/b_conv1x7_1"], "ira_B/b_conv7x1_1", _xy(7, 1), padding=_xy(3, 0))],
        }, w["ira_B/a_conv1x1_1"] + w["ira_B/b_conv7x1_1"], c_eighth)
        self.reduction_B = Concat({
            "a": [pool("a_pool")],
            "b": [cbn(c_eighth, "reduction_B/b_conv1x1_1", 1),
                  cbn(w["reduction_B/b_conv1x1_1"], "reduction_B/b_conv3x3_1", 3, stride=2,
                      padding=1)],
            "c": [cbn(c_eighth, "reduction_B/c_conv1x1_1", 1),
                  cbn(w["reduction_B/c_conv1x1_1"], "reduction_B/c_conv3x3_1", 3, stride=2,
                      padding=1)],
            "d": [cbn(c_eighth, "reduction_B/d_conv1x1_1", 1),
                  cbn(w["reduction_B/d_conv1x1_1"], "reduction_B/d_conv3x3_1", 3, padding=1),
                  cbn(w["reduction_B/d_conv3x3_1"], "reduction_B/d_conv3x3_2", 3, stride=2,
                      padding=1)],
        })
        c = (c_eighth + w["reduction_B/b_conv3x3_1"] + w["reduction_B/c_conv3x3_1"]
             + w["reduction_B/d_conv3x3_2"])
        # 1/16: Inception-ResNet-C on the conv5_1b trunk -> conv5_sum.
        self.conv5_1b = ConvBN(c, w["conv5_1b"], 1)
        c_16th = w["conv5_1b"]
        self.ira_C = InceptionResNet({
            "a": [cbn(c_16th, "ira_C/a_conv1x1_1", 1)],
            "b": [cbn(c_16th, "ira_C/b_conv1x1_1", 1),
                  cbn(w["ira_C/b_conv1x1_1"], "ira_C/b_conv1x3_1", _xy(1, 3), padding=_xy(0, 1)),
                  cbn(w["ira_C/b_conv1x3_1"], "ira_C/b_conv3x1_1", _xy(3, 1), padding=_xy(1, 0))],
        }, w["ira_C/a_conv1x1_1"] + w["ira_C/b_conv3x1_1"], c_16th)
        # Decoder: four side outputs summed (deconv_all_sum).
        side, out, final_relu = w["side"], self.out_channels, head == "boundary"
        self.side_2x = SideOutput(c_half, 2, DILATIONS, side, out, final_relu)
        self.side_4x = SideOutput(c_quarter, 4, DILATIONS, side, out, final_relu)
        self.side_8x = SideOutput(c_eighth, 8, DILATIONS, side, out, final_relu)
        self.side_16x = SideOutput(c_16th, 16, (), side, out, final_relu)

        # Receptive fields as (x, y, z) half-widths in voxels, exact (Span arithmetic; the
        # gradient probe empirical_receptive_field agrees): the whole network sees 230 px each
        # way in-plane (the 8x dilation-23 deconv alone spans about +-172), the encoder's
        # deepest features (conv5_sum) only 87. Widths do not change them.
        self.receptive_field, self.encoder_receptive_field = self._receptive_fields()
        # What inference reads around an output voxel. The exact receptive field: an output
        # voxel whose 230 px each way lie inside the patch (patch origin on the 16-pixel grid)
        # has the value whole-volume inference gives it, so a patch's window needs no blending
        # to be seam-free. A caller short of memory may trade that for less (the encoder's 87
        # px keeps the deep features exact; the far dilated taps then read padding).
        self.context: tuple[int, int, int] = self.receptive_field

    # -- the forward pass ---------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        # Each scale's side output is taken, and its features dropped, as soon as the next scale
        # is computed: the sum is the same ((2x + 4x) + 8x) + 16x, and at most two scales'
        # features are alive at once (measured on a 2528 px tile, small preset, CPU inference
        # form, 2 threads: peak memory above the process's base 1,144 -> 980 MiB). The outputs
        # are those of the former order bit for bit; in training, the gradients reaching a
        # scale's features from its readers add up in another order (last bits only).
        half = self.stem(self.conv1_2(self.conv1_1(x)).squeeze(2))  # z is 1 now: drop it
        out = self.side_2x(half)
        quarter = self.ira_A(self.conv3_1b(self.stem_reduction(half)))
        del half
        out = out + self.side_4x(quarter)
        eighth = self.ira_B(self.conv4_1b(self.reduction_A(quarter)))
        del quarter
        out = out + self.side_8x(eighth)
        sixteenth = self.ira_C(self.conv5_1b(self.reduction_B(eighth)))
        del eighth
        return out + self.side_16x(sixteenth)

    def check_input(self, x: torch.Tensor) -> None:
        """Raise ValueError, naming the fix, for an input forward cannot take."""
        shape = tuple(x.shape)
        if x.dim() != 5 or shape[1] != 1:
            raise ValueError(f"expected input (N, 1, Z, Y, X), got shape {shape}")
        if shape[2] != self.in_sections:
            raise ValueError(f"this model takes {self.in_sections} sections along z, got "
                             f"{shape[2]}: give a stack of {self.in_sections} sections")
        y, xx = shape[3], shape[4]
        if y < DIVISOR or xx < DIVISOR or y % DIVISOR or xx % DIVISOR:
            raise ValueError(f"in-plane size {y} x {xx} is not a positive multiple of "
                             f"{DIVISOR}: pad or crop the input to multiples of {DIVISOR}")
        if not x.is_floating_point():
            raise ValueError(f"expected a float input, got {x.dtype}: pass it through "
                             "model.normalize first")

    # -- what callers need to know ------------------------------------------------------------

    @property
    def config(self) -> dict:
        """JSON-able keyword arguments that rebuild this architecture: build_model(**config)."""
        cfg: dict = {
            "preset": self.preset, "head": self.head, "in_sections": self.in_sections,
            "input_mean": float(self.input_mean), "input_std": float(self.input_std),
        }
        if self._custom_widths:
            cfg["widths"] = dict(self.widths)
        return cfg

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Raw intensities (uint8, 0..255) -> the input forward expects, on the model's device
        and in its dtype: (x - 127.5) / 127.5 by default, in [-1, 1]. The two constants are
        buffers, so they are saved with the weights (and recorded in `config`)."""
        x = torch.as_tensor(x).to(device=self.input_mean.device, dtype=torch.float32)
        x = (x - self.input_mean.float()) / self.input_std.float()
        return x.to(self.conv1_1.conv.weight.dtype)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits -> p(boundary) (N, 1, Y, X) or affinities (N, 3, Y, X), all in [0, 1]."""
        if self.head == "boundary":
            return torch.softmax(logits, dim=1)[:, 1:2]
        return torch.sigmoid(logits)

    def count_macs(self, size: int | tuple[int, int] = 320) -> int:
        """Multiply-adds of every conv and deconv for one input of `size` (y, x), counted on
        a shape-only copy of this architecture (meta tensors: nothing is computed)."""
        return count_macs(self.config, size)

    def flops_per_output_voxel(self, size: int | tuple[int, int] = 320) -> float:
        """2 x multiply-adds per output voxel (one multiply + one add = 2 FLOPs)."""
        y, x = (size, size) if isinstance(size, int) else size
        return 2 * self.count_macs((y, x)) / (y * x)

    # -- receptive field ----------------------------------------------------------------------

    def _scale_spans(self) -> dict[str, Spans]:
        """In-plane (y, x) spans of the features each side output reads, keyed by its scale."""
        spans = self.conv1_2.spans(self.conv1_1.spans((Span(), Span(), Span())))[1:]  # drop z
        half = self.stem.spans(spans)
        quarter = self.ira_A.spans(self.conv3_1b.spans(self.stem_reduction.spans(half)))
        eighth = self.ira_B.spans(self.conv4_1b.spans(self.reduction_A.spans(quarter)))
        sixteenth = self.ira_C.spans(self.conv5_1b.spans(self.reduction_B.spans(eighth)))
        return {"2x": half, "4x": quarter, "8x": eighth, "16x": sixteenth}

    def side_spans(self) -> dict[str, Spans]:
        """Exact (y, x) spans of each side output alone, in input pixels."""
        return {name: getattr(self, f"side_{name}").spans(spans)
                for name, spans in self._scale_spans().items()}

    def _receptive_fields(self) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
        """(whole network, encoder only) receptive field as (x, y, z) half-widths."""
        out = _union(list(self.side_spans().values()))
        deepest = self._scale_spans()["16x"]
        z = (self.in_sections - 1) // 2
        return ((out[1].half_width, out[0].half_width, z),
                (deepest[1].half_width, deepest[0].half_width, z))


def build_model(
    preset: str = "small", head: str = "boundary", in_sections: int = 5, *,
    input_mean: float = INPUT_MEAN, input_std: float = INPUT_STD,
    widths: Mapping[str, int] | None = None,
) -> DeepEM3DNet:
    """The DeepEM3D network for a preset ('full', 'small', 'tiny'), head ('boundary' or
    'affinity') and number of input sections (1, 3 or 5). `widths` (every layer of
    presets.WIDTH_TABLE) replaces the preset's channel widths; `preset` is then just a label.

    An affinity model with in_sections=1 is allowed but sees no neighbouring section: its z
    channel (affinity with the section below) can only be guessed from in-plane cues."""
    return DeepEM3DNet(preset, head, in_sections, input_mean=input_mean, input_std=input_std,
                       widths=widths)


# ---------------------------------------------------------------------------------------------
# Cost and receptive-field measurements


def count_macs(config: Mapping, size: int | tuple[int, int] = 320, batch: int = 1) -> int:
    """Multiply-adds of every conv/deconv of build_model(**config) on `batch` inputs of
    `size` (y, x). Conv: output elements x (in channels x kernel taps); deconv: input elements
    x (out channels x kernel taps), what a direct deconv computes (taps falling in the cropped
    padding included). BatchNorm, ReLU, pooling and sums are left out (a few per voxel)."""
    y, x = (size, size) if isinstance(size, int) else size
    with torch.device("meta"):
        model = build_model(**config).eval()
        inp = torch.empty(batch, 1, model.in_sections, y, x)
    total = 0

    def hook(module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal total
        taps = math.prod(module.weight.shape[2:])
        if isinstance(module, nn.ConvTranspose2d):
            total += args[0].numel() * module.out_channels * taps
        else:
            total += output.numel() * (module.in_channels // module.groups) * taps

    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d)):
            m.register_forward_hook(hook)
    with torch.no_grad():
        model(inp)
    return total


def flops_per_output_voxel(
    preset: str = "small", in_sections: int = 5, head: str = "boundary",
    size: int | tuple[int, int] = 320,
) -> float:
    """FLOPs (2 x multiply-adds of convs and deconvs) per output voxel on a `size` input."""
    y, x = (size, size) if isinstance(size, int) else size
    config = {"preset": preset, "head": head, "in_sections": in_sections}
    return 2 * count_macs(config, (y, x)) / (y * x)


def empirical_receptive_field(
    in_sections: int = 5, size: int = 512, phases: int = DIVISOR,
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Measured receptive field: ((x_lo, x_hi), (y_lo, y_hi)), the offsets from an output pixel
    of the furthest input pixels its gradient reaches, over `phases` output positions (the
    network has stride 16, so what an output pixel sees depends on its position modulo 16).

    Uses the architecture with one channel per layer, all weights 1, no biases, no ReLU and
    average instead of max pooling: every path then adds a positive term (at least ~1e-3, at
    most ~1e11 here: far from float32's limits), so the gradient is non-zero exactly on the
    receptive field (no cancellation, no dead ReLU). The receptive field does not depend on
    channel widths, so this holds for every preset.
    """
    widths = {k: 1 for k in WIDTH_TABLE}
    model = build_model("probe", "boundary", in_sections, widths=widths).eval()
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, nn.ReLU):
                setattr(parent, name, nn.Identity())
            elif isinstance(child, nn.MaxPool2d):
                setattr(parent, name, nn.AvgPool2d(child.kernel_size, child.stride,
                                                   child.padding, ceil_mode=True))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d)):
                m.weight.fill_(1.0)
                m.bias.zero_()
    model.requires_grad_(False)  # only the input's gradient is wanted
    x = torch.ones(phases, 1, in_sections, size, size, requires_grad=True)
    centres = [size // 2 + r for r in range(phases)]  # sample r: output pixel (c + r, c + r)
    out = model(x)
    sum(out[r, :, c, c].sum() for r, c in enumerate(centres)).backward()
    x_lo = y_lo = size
    x_hi = y_hi = -size
    for r, c in enumerate(centres):
        reach = (x.grad[r, 0] > 0).any(dim=0)  # (Y, X)
        ys = torch.nonzero(reach.any(dim=1)).flatten()
        xs = torch.nonzero(reach.any(dim=0)).flatten()
        if min(ys[0], xs[0]) == 0 or max(ys[-1], xs[-1]) == size - 1:
            raise ValueError(f"the receptive field reaches the border of a {size} input: "
                             "use a larger size")
        x_lo, x_hi = min(x_lo, int(xs[0]) - c), max(x_hi, int(xs[-1]) - c)
        y_lo, y_hi = min(y_lo, int(ys[0]) - c), max(y_hi, int(ys[-1]) - c)
    return ((x_lo, x_hi), (y_lo, y_hi))


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Learnable parameters split as the table counts them: conv/deconv weights + biases, and
    BatchNorm affine (Caffe Scale) parameters."""
    conv = sum(p.numel() for m in model.modules()
               if isinstance(m, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d))
               for p in m.parameters(recurse=False))
    bn = sum(p.numel() for m in model.modules()
             if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm3d))
             for p in m.parameters(recurse=False))
    return {"conv": conv, "batchnorm": bn, "total": conv + bn}


__all__ = [
    "DIVISOR", "HEADS", "PRESETS", "SECTIONS", "DeepEM3DNet", "Span", "build_model",
    "count_macs", "empirical_receptive_field", "flops_per_output_voxel", "parameter_counts",
]
