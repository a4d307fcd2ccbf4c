"""The DeepEM3D network: faithful size, shapes, config round trip, context, learning."""

from __future__ import annotations

import json

import pytest
import torch

from deepem3d.models.network import (
    DIVISOR,
    HEADS,
    PRESETS,
    SECTIONS,
    build_model,
    count_macs,
    empirical_receptive_field,
    flops_per_output_voxel,
    parameter_counts,
)
from deepem3d.models.presets import WIDTH_TABLE, preset_widths

TABLE_CONV_PARAMS = 24_014_188  # conv/deconv weights + biases, docs/network.md
TABLE_BN_PARAMS = 26_056  # BatchNorm scale + shift


def _input(n: int, sections: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, sections, size, size, generator=g)


def test_full_preset_matches_the_published_network():
    torch.manual_seed(0)
    model = build_model("full", "boundary", 5).eval()
    counts = parameter_counts(model)
    assert counts == {"conv": TABLE_CONV_PARAMS, "batchnorm": TABLE_BN_PARAMS,
                      "total": TABLE_CONV_PARAMS + TABLE_BN_PARAMS}
    total = sum(p.numel() for p in model.parameters())
    assert abs(total - 24.04e6) / 24.04e6 < 0.01
    with torch.no_grad():
        logits = model(_input(1, 5, 320))
    assert logits.shape == (1, 2, 320, 320)
    assert torch.isfinite(logits).all()


def test_deconv_paddings_are_the_tables():
    model = build_model("tiny")
    table = {  # layer: (kernel, stride, pad, dilation) from docs/network.md
        "side_2x": [(4, 2, 1, 1), (4, 2, 7, 5), (4, 2, 16, 11), (4, 2, 25, 17), (4, 2, 34, 23)],
        "side_4x": [(8, 4, 2, 1), (8, 4, 16, 5), (8, 4, 37, 11), (8, 4, 58, 17), (8, 4, 79, 23)],
        "side_8x": [(16, 8, 4, 1), (16, 8, 34, 5), (16, 8, 79, 11), (16, 8, 124, 17),
                    (16, 8, 169, 23)],
        "side_16x": [(32, 16, 8, 1)],
    }
    for name, rows in table.items():
        side = getattr(model, name)
        got = [(d.kernel_size[0], d.stride[0], d.padding[0], d.dilation[0])
               for d in [side.deconv, *side.dilated]]
        assert got == rows, name


@pytest.mark.parametrize("preset", PRESETS)
def test_every_variant_gives_logits_of_the_middle_section(preset):
    for sections in SECTIONS:
        for head in HEADS:
            torch.manual_seed(0)
            model = build_model(preset, head, sections).eval()
            with torch.no_grad():
                logits = model(_input(2, sections, 64))
            channels = 2 if head == "boundary" else 3
            assert logits.shape == (2, channels, 64, 64), (preset, sections, head)
            assert torch.isfinite(logits).all(), (preset, sections, head)
            probs = model.probabilities(logits)
            assert probs.shape == (2, 1 if head == "boundary" else 3, 64, 64)
            assert probs.min() >= 0 and probs.max() <= 1
            assert model.context[2] == (sections - 1) // 2


def test_probabilities_are_the_boundary_class_or_sigmoids():
    logits = torch.randn(3, 2, 16, 16) * 5
    boundary = build_model("tiny", "boundary").probabilities(logits)
    assert torch.allclose(boundary[:, 0], torch.softmax(logits, 1)[:, 1])
    assert boundary.min() >= 0 and boundary.max() <= 1
    affinity_logits = torch.randn(3, 3, 16, 16) * 5
    affinity = build_model("tiny", "affinity").probabilities(affinity_logits)
    assert torch.allclose(affinity, torch.sigmoid(affinity_logits))
    # the affinity head drops the final ReLU, so probabilities below 0.5 are reachable
    model = build_model("tiny", "affinity").eval()
    with torch.no_grad():
        assert (model(_input(1, 5, 64)) < 0).any()


def test_bad_inputs_and_arguments_raise_value_errors():
    model = build_model("tiny", in_sections=1)
    with pytest.raises(ValueError, match="1 sections"):
        model(_input(1, 5, 64))
    model = build_model("tiny")
    with pytest.raises(ValueError, match="multiple of 16"):
        model(_input(1, 5, 72))
    with pytest.raises(ValueError, match="multiple of 16"):
        model(torch.zeros(1, 1, 5, 64, 40))
    with pytest.raises(ValueError, match=r"\(N, 1, Z, Y, X\)"):
        model(torch.zeros(1, 5, 64, 64))
    with pytest.raises(ValueError, match="normalize"):
        model(torch.zeros(1, 1, 5, 64, 64, dtype=torch.uint8))
    for kwargs in ({"preset": "huge"}, {"head": "affinities"}, {"in_sections": 2},
                   {"in_sections": 7}, {"in_sections": True}, {"input_std": 0.0}):
        with pytest.raises(ValueError):
            build_model(**kwargs)
    with pytest.raises(ValueError, match="widths lack"):
        build_model("custom", widths={"conv1_1": 4})


def test_config_is_json_and_rebuilds_the_same_architecture():
    for model in (build_model("tiny", "affinity", 3), build_model("small", "boundary", 1),
                  build_model("mine", widths={**preset_widths("tiny"), "conv5_1b": 64})):
        config = json.loads(json.dumps(model.config))
        assert {"preset", "head", "in_sections"} <= set(config)
        rebuilt = build_model(**config)
        assert rebuilt.config == model.config
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        assert shapes == {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()}
        assert rebuilt.context == model.context and rebuilt.divisor == DIVISOR == 16


def test_normalize_maps_uint8_to_the_saved_float_range():
    model = build_model("tiny")
    raw = torch.tensor([0, 127, 255], dtype=torch.uint8)
    x = model.normalize(raw)
    assert x.dtype == torch.float32
    assert torch.allclose(x, torch.tensor([-1.0, -0.5 / 127.5, 1.0]))
    state = model.state_dict()
    assert float(state["input_mean"]) == 127.5 and float(state["input_std"]) == 127.5
    custom = build_model("tiny", input_mean=100.0, input_std=50.0)
    assert torch.allclose(custom.normalize(raw), (raw.float() - 100) / 50)
    assert build_model(**custom.config).config["input_std"] == 50.0


def test_widths_table_is_consistent():
    assert set(preset_widths("full")) == set(WIDTH_TABLE)
    full, small, tiny = (preset_widths(p) for p in ("full", "small", "tiny"))
    for layer in WIDTH_TABLE:
        if layer != "side":
            assert full[layer] > small[layer] > tiny[layer] > 0, layer


def test_receptive_field_analytic_equals_measured():
    model = build_model("tiny")
    assert model.receptive_field == (230, 230, 2)
    assert model.encoder_receptive_field == (87, 87, 2)
    assert model.context == model.receptive_field
    # the exact spans of the analytic path are [-230, +225]; the gradient probe over all 16
    # output phases must find exactly those
    assert empirical_receptive_field(in_sections=1) == ((-230, 225), (-230, 225))
    assert build_model("full", in_sections=1).receptive_field == (230, 230, 0)


def test_context_makes_a_patch_equal_the_whole_image():
    """An output pixel whose receptive field lies in the patch gets the whole-image value."""
    torch.manual_seed(0)
    model = build_model("tiny", in_sections=1).eval()
    context = model.context[0]
    margin = -(-context // DIVISOR) * DIVISOR  # 240: context rounded up to the grid
    image = _input(1, 1, 2 * margin + 160)
    with torch.no_grad():
        whole = model(image)
        start = 64  # a patch whose origin is on the 16-pixel grid
        patch = model(image[..., start:, start:][..., : 2 * margin + 32, : 2 * margin + 32])
    window = slice(margin, margin + 32)
    got = patch[..., window, window]
    want = whole[..., start + margin : start + margin + 32, start + margin : start + margin + 32]
    assert torch.allclose(got, want, atol=1e-4)
    # and a patch of half the context does differ: the far (dilated) taps matter
    with torch.no_grad():
        small = model(image[..., start + margin - 128 :, start + margin - 128 :][..., :288, :288])
    assert not torch.allclose(small[..., 128:160, 128:160], want, atol=1e-4)


def test_flops_are_counted_per_output_voxel():
    tiny = flops_per_output_voxel("tiny", 5)
    small = flops_per_output_voxel("small", 5)
    full = flops_per_output_voxel("full", 5)
    assert 0 < tiny < small < full
    assert flops_per_output_voxel("full", 1) < full  # 3x3x1 first convs
    model = build_model("small")
    assert model.flops_per_output_voxel(64) == 2 * count_macs(model.config, 64) / 64**2
    # the 16x deconv alone: 2048 channels x 2 out x 32 x 32 taps per 1/16 pixel (256 outputs)
    assert full > 2 * 2048 * 2 * 32 * 32 / 256


def test_tiny_model_learns_a_fixed_batch():
    torch.manual_seed(0)
    model = build_model("tiny", "boundary", 5).train()
    x = _input(2, 5, 64, seed=1)
    target = (_input(2, 1, 64, seed=2)[:, 0, 0] > 0.5).long()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    losses = []
    for _ in range(10):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses


def test_same_seed_same_outputs():
    outputs = []
    for _ in range(2):
        torch.manual_seed(123)
        model = build_model("tiny", "affinity", 3).eval()
        with torch.no_grad():
            outputs.append(model(_input(2, 3, 64)))
    assert torch.equal(outputs[0], outputs[1])


@pytest.mark.parametrize(("preset", "head", "sections"),
                         [("tiny", "boundary", 5), ("tiny", "affinity", 3),
                          ("tiny", "boundary", 1), ("small", "affinity", 5)])
def test_inference_form_computes_the_same_function(preset, head, sections):
    """BatchNorms folded, the 3D part as 2D convolutions, the side outputs' deconvolutions as
    matrix products and shifted adds, channels-last: the logits of the module as trained, to float32
    rounding, with BatchNorm statistics far from the identity."""
    from deepem3d.models.inference_form import inference_form

    torch.manual_seed(0)
    model = build_model(preset, head, sections)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d | torch.nn.BatchNorm3d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.5, 0.5)
    model.eval()
    form = inference_form(model)
    x = model.normalize(torch.randint(0, 256, (2, 1, sections, 96, 128), dtype=torch.uint8))
    with torch.no_grad():
        expected, found = model(x), form(x)
    assert found.shape == expected.shape
    assert (found - expected).abs().max() <= 1e-5 * expected.abs().max()
    assert form.normalize(x).dtype == torch.float32
    assert not any(p.requires_grad for p in form.parameters())
    assert all(p.requires_grad for p in model.parameters())  # the model itself is untouched


def test_the_inference_form_keeps_the_models_device_and_dtype():
    """The form is made of a model already moved to its device (ModelPredictor): its first
    two convolutions were made with torch's defaults, on the CPU in float32, so every form
    forward on a GPU failed. Seen here through the dtype: a float64 model's form is float64
    throughout and computes its function."""
    from deepem3d.models.inference_form import inference_form

    torch.manual_seed(0)
    model = build_model("tiny", "boundary", 5).double().eval()
    form = inference_form(model)
    assert {p.dtype for p in form.parameters()} == {torch.float64}
    x = torch.rand(1, 1, 5, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(form(x), model(x), rtol=0, atol=1e-12)


def test_side_outputs_by_bands_equal_one_col2im_and_do_not_depend_on_the_bands(monkeypatch):
    """A side output on the CPU (matrix products over bands of rows, shifted adds) gives what
    one matrix product and col2im per dilation give (the path other devices, autocast and
    small inputs take), and the same floats however many rows a band holds: each pixel sums
    its taps in one order. Bands of at least 256 columns, as the code's own bands on a tile:
    below about 200 MKL rounds products differently (one-row bands of 6 columns differed in
    the last bit on an AMD EPYC)."""
    from deepem3d.models import inference_form as module

    torch.manual_seed(0)
    form = module.inference_form(build_model("tiny", "affinity", 5).eval())
    monkeypatch.setattr(module._SideByBands, "BANDS_FROM", 0)
    with torch.no_grad():
        for name in ("side_2x", "side_4x", "side_8x", "side_16x"):
            side = getattr(form, name)
            x = torch.randn(2, side.weight.shape[2], 1024 // side.scale, 512 // side.scale)
            x = x.contiguous(memory_format=torch.channels_last)
            width = x.shape[3]
            banded = side(x)
            by_fold = side._forward_by_fold(x)
            assert (banded - by_fold).abs().max() <= 1e-6 * by_fold.abs().max()
            with monkeypatch.context() as patch:
                rows = -(-256 // width)  # the fewest rows that make 256 columns
                patch.setattr(module._SideByBands, "PLANE", side.channels * width * rows)
                assert -(-module._SideByBands.PLANE // (side.channels * width)) < x.shape[2]
                assert torch.equal(side(x), banded)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                assert side(x).dtype == torch.bfloat16  # the col2im path: products in bf16


def test_side_output_floats_do_not_depend_on_where_a_tile_cuts(monkeypatch):
    """At the full preset's widths MKL rounds a product of few columns differently: with the
    last band overlapping the one before it, a crop that starts two input rows lower (its
    bands cut elsewhere) gives the same floats wherever its inputs are the whole's."""
    from deepem3d.models import inference_form as module
    from deepem3d.models.network import DILATIONS, SideOutput

    torch.manual_seed(0)
    with torch.no_grad():
        side = module._SideByBands(SideOutput(1154, 8, DILATIONS, 2, 3, False).eval())
    monkeypatch.setattr(module._SideByBands, "BANDS_FROM", 0)
    monkeypatch.setattr(module._SideByBands, "PLANE", 2 * 512)  # bands of 32 rows of 16 px
    x = torch.randn(1, 1154, 34, 16).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        whole = side(x)
        crop = side(x[:, :, 2:].contiguous(memory_format=torch.channels_last))
    # output rows whose taps (and the 3x3 conv's) read only input rows 2.. of the whole
    first = 2 * 8 - 169 + 15 * 23 + 1
    assert torch.equal(whole[:, :, first:], crop[:, :, first - 16:])
