"""Channel widths of the DeepEM3D presets, kept as one table so a preset is data, not code.

Every preset has the same topology as the published network (docs/network.md): the
same blocks, branches, kernels, strides, paddings and dilated decoder; only the number of
channels changes. `full` is the authors' Caffe definition; `small` is about 1/4 and `tiny` about
1/8 of its width (so about 1/16 and 1/64 of its encoder weights), small enough to train on a
laptop CPU. Keys are the Caffe layer names (shortened where they are long); each value is the
layer's number of output channels in the columns `PRESETS` names.
"""

from __future__ import annotations

PRESETS: tuple[str, ...] = ("full", "small", "tiny")

# fmt: off
# layer (Caffe name)                   full  small  tiny
WIDTH_TABLE: dict[str, tuple[int, int, int]] = {
    # 3D part (conv1_1 at 1/2 in-plane; conv1_2 collapses z to one section)
    "conv1_1":                        (32,    8,    4),
    "conv1_2":                        (64,   16,    8),
    # stem at 1/2: branch 1 (1x1 -> 3x3) + branch 2 (1x1 -> 7x1 -> 1x7 -> 3x3) -> concat_stem_1
    "conv2_1b":                       (64,   16,    8),
    "conv2_1b_3x3":                   (96,   24,   12),
    "conv2_1x1":                      (64,   16,    8),
    "conv2_1x7":                      (64,   16,    8),
    "conv2_7x1":                      (64,   16,    8),
    "conv2_3x3":                      (96,   24,   12),
    # stem reduction to 1/4: 3x3 stride-2 conv beside a max pool of concat_stem_1
    "stem_concat_conv_3x3":           (192,  48,   24),
    # Inception-ResNet-A at 1/4 (conv3_1b is the residual trunk)
    "conv3_1b":                       (384,  96,   48),
    "ira_A_1_conv1x1":                (32,    8,    4),
    "ira_A_2_conv1x1":                (32,    8,    4),
    "ira_A_2_conv3x3":                (32,    8,    4),
    "ira_A_3_conv1x1":                (32,    8,    4),
    "ira_A_3_conv3x3_1":              (48,   12,    6),
    "ira_A_3_conv3x3_2":              (64,   16,    8),
    # Reduction-A to 1/8: pool + 3x3/2 + (1x1 -> 3x3 -> 3x3/2)
    "reduction_A/conv3x3_reduction_b": (384,  96,   48),
    "reduction_A/conv1x1_c":          (256,  64,   32),
    "reduction_A/conv3x3_c":          (256,  64,   32),
    "reduction_A/conv3x3_reduction_c": (384,  96,   48),
    # Inception-ResNet-B at 1/8 (conv4_1b is the residual trunk)
    "conv4_1b":                       (1154, 288, 144),
    "ira_B/a_conv1x1_1":              (192,  48,   24),
    "ira_B/b_conv1x1_1":              (128,  32,   16),
    "ira_B/b_conv1x7_1":              (160,  40,   20),
    "ira_B/b_conv7x1_1":              (192,  48,   24),
    # Reduction-B to 1/16: pool + three (1x1 -> [3x3 ->] 3x3/2) branches
    "reduction_B/b_conv1x1_1":        (256,  64,   32),
    "reduction_B/b_conv3x3_1":        (384,  96,   48),
    "reduction_B/c_conv1x1_1":        (256,  64,   32),
    "reduction_B/c_conv3x3_1":        (288,  72,   36),
    "reduction_B/d_conv1x1_1":        (256,  64,   32),
    "reduction_B/d_conv3x3_1":        (288,  72,   36),
    "reduction_B/d_conv3x3_2":        (320,  80,   40),
    # Inception-ResNet-C at 1/16 (conv5_1b is the residual trunk)
    "conv5_1b":                       (2048, 512, 256),
    "ira_C/a_conv1x1_1":              (192,  48,   24),
    "ira_C/b_conv1x1_1":              (192,  48,   24),
    "ira_C/b_conv1x3_1":              (224,  56,   28),
    "ira_C/b_conv3x1_1":              (256,  64,   32),
    # decoder: channels of every (dilated) deconv and side output, before the head's 3x3 conv
    "side":                           (2,     2,    2),
}
# fmt: on

# Dilations of the four extra deconvs at 1/2, 1/4 and 1/8 (the plain deconv has dilation 1).
# Kept in every preset: they set the receptive field, which does not depend on width.
DILATIONS: tuple[int, ...] = (5, 11, 17, 23)


def preset_widths(preset: str) -> dict[str, int]:
    """The channel widths of a named preset, as {layer: out channels}."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
    column = PRESETS.index(preset)
    return {layer: row[column] for layer, row in WIDTH_TABLE.items()}
