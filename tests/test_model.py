"""Architecture: shapes at every scale and odd sizes, the bicubic base, input validation."""

from __future__ import annotations

import numpy as np
import pytest

from batchsr.model import BicubicUpsample, ModelConfig, build_model
from batchsr.resize import imresize


@pytest.mark.parametrize("arch", ["unet", "seed"])
@pytest.mark.parametrize("scale", [2, 3, 4])
def test_output_is_scale_times_input_at_odd_sizes(arch, scale):
    model = build_model(ModelConfig(arch=arch, scale=scale, width=4, depth=2, blocks=1))
    for h, w in [(13, 21), (1, 7), (16, 16)]:
        out = np.asarray(model(np.random.rand(2, h, w, 3).astype("float32")))
        assert out.shape == (2, h * scale, w * scale, 3)
        assert np.isfinite(out).all()


def test_layers_are_named_and_depth_changes_the_layout():
    deep = build_model(ModelConfig(width=4, depth=3, blocks=0))
    names = {layer.name for layer in deep.layers}
    assert {"enc0_pool", "enc2_pool", "bottleneck_in_conv", "dec2_up", "dec0_concat", "head_conv", "head_shuffle"} <= names
    shallow = build_model(ModelConfig(width=4, depth=1, blocks=0))
    assert "enc1_pool" not in {layer.name for layer in shallow.layers}
    top_heavy = {layer.name for layer in build_model(ModelConfig(width=4, depth=1, blocks=1, top_blocks=3)).layers}
    assert {"enc0_res2_add", "dec0_res2_add", "bottleneck_res0_add"} <= top_heavy
    assert not {"enc0_res3_add", "bottleneck_res1_add"} & top_heavy


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_bicubic_base_matches_matlab_away_from_borders(scale):
    x = np.random.default_rng(scale).random((1, 20, 18, 3)).astype("float32")
    up = np.asarray(BicubicUpsample(scale)(x))[0]
    ref = imresize(x[0].astype(np.float64), size=(20 * scale, 18 * scale))
    m = 2 * scale
    assert np.abs(up - ref)[m:-m, m:-m].max() < 1e-5


def test_zero_detail_head_returns_the_bicubic_base():
    import keras

    model = build_model(ModelConfig(width=4, depth=1, blocks=0))
    head = model.get_layer("head_conv")
    head.set_weights([np.zeros_like(w) for w in head.get_weights()])
    x = np.random.rand(1, 12, 12, 3).astype("float32")
    base = keras.ops.convert_to_numpy(BicubicUpsample(4)(x))
    assert np.allclose(np.asarray(model(x)), base, atol=1e-6)


def test_mixed_precision_rounds_only_the_learned_detail():
    """Under mixed_bfloat16 the input and its bicubic base stay float32 (bfloat16 keeps 8 bits of mantissa,
    coarser than a 16-bit image's levels): with a zero head the output is the float32 base."""
    import keras

    x = np.random.default_rng(3).random((1, 12, 12, 3)).astype("float32")
    base = keras.ops.convert_to_numpy(BicubicUpsample(4)(x))
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = build_model(ModelConfig(width=4, depth=1, blocks=0))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    head = model.get_layer("head_conv")
    head.set_weights([np.zeros_like(w) for w in head.get_weights()])
    assert np.abs(np.asarray(model(x)) - base).max() < 1e-6


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"scale": 5}, "scale must be one of"),
        ({"arch": "resnet"}, "arch must be one of"),
        ({"width": 2}, "width must be"),
        ({"depth": 9}, "depth must be"),
        ({"top_blocks": 17}, "top_blocks must be"),
        ({"scale": 4.0}, "scale must be one of"),  # passed before, then failed deep in Keras without the key
        ({"depth": True}, "depth must be"),
        ({"slope": "0.2"}, "slope must be a number"),  # a TypeError that named nothing
    ],
)
def test_bad_config_names_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        build_model(ModelConfig(**kwargs))
    assert str(list(kwargs.values())[0]) in str(info.value)


def test_config_round_trip_rejects_unknown_keys():
    config = ModelConfig(width=8)
    assert ModelConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="colour"):
        ModelConfig.from_dict({**config.to_dict(), "colour": 1})


def test_model_cost_script_counts_the_card_figures():
    """docs/MODEL.md quotes scripts/model_cost.py: parameters and multiply-adds per input pixel."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("model_cost", Path(__file__).parents[1] / "scripts" / "model_cost.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    params, macs = module.cost(build_model(ModelConfig("unet", 4, 32, 2, 2)))
    assert params == 1_200_176 and round(macs / 1e6, 3) == 0.249
    params, macs = module.cost(build_model(ModelConfig("unet", 4, 32, 2, 1, top_width=48, top_blocks=2)))  # the bundled x4 shape
    assert params == 893_328 and round(macs / 1e6, 3) == 0.320
    # By hand for a one-stage net: 3x3 convs 3->4 and 4->4 (in + one block), then the x2 head 4->12.
    params, macs = module.cost(build_model(ModelConfig("unet", 2, 4, 0, 1)))
    assert macs == 9 * (3 * 4 + 4 * 4 + 4 * 4 + 4 * 12)
    _, seed = module.cost(build_model(ModelConfig("seed", 4, 32, 2, 2)))
    assert round(seed / 1e6, 2) == 3.78
    # The reference the speed bound is measured against (bench_cpu.py): 16 blocks of 64 channels, x4 sub-pixel upsampler.
    import sys

    sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
    from bench_cpu import edsr_baseline

    _, edsr = module.cost(edsr_baseline(4))
    # Per input pixel, 3x3 kernels: head 3->64, 33 convs 64->64, 64->256 at 1x and at 2x (4 pixels), 64->3 at 4x (16).
    assert round(edsr / 1e6, 2) == 1.98 and edsr == 9 * 64 * (3 + 33 * 64 + 256 + 4 * 256 + 16 * 3)
