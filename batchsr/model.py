"""The batchsr U-Net: architecture only, readable top to bottom.

``unet`` works at the low resolution: encoder stages of convolution + leaky
ReLU (+ residual blocks) and max-pooling, a bottleneck, decoder stages of
transposed-convolution upsampling + skip concatenation + convolution, then a
sub-pixel (depth-to-space) head added to a bicubic copy of the input, so the
network only learns the missing detail.

``seed`` is the original layout kept for comparison: bicubic pre-upsampling and
the same kind of U-Net at full resolution, no global residual.

Pure Keras 3 (``keras.layers`` / ``keras.ops``): the same model runs on the
TensorFlow, JAX and PyTorch backends.  Images are float RGB in [0, 1].
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import keras
import numpy as np
from keras import layers, ops

ARCHS = ("unet", "seed")
SCALES = (2, 3, 4)


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "unet"
    scale: int = 4
    width: int = 32  # channels of the first stage; doubled at each level down
    depth: int = 2  # number of max-pooling levels
    blocks: int = 2  # residual blocks per stage
    top_width: int = 0  # channels of the full-resolution stages (level 0); 0: ``width``
    slope: float = 0.2  # leaky ReLU negative slope
    top_blocks: int | None = None  # residual blocks of the full-resolution stages; None: ``blocks``

    def stage_width(self, level: int) -> int:
        if level == 0 and self.top_width:
            return self.top_width
        return self.width * 2**level

    def stage_blocks(self, level: int) -> int:
        if level == 0 and self.top_blocks is not None:
            return self.top_blocks
        return self.blocks

    @property
    def multiple(self) -> int:
        """Input sides are padded internally to a multiple of this."""
        return 2**self.depth

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown model config keys {unknown}; allowed: {sorted(known)}")
        return cls(**data)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # True is an int to Python, 4.0 equals 4


def validate_config(config: ModelConfig) -> None:
    if config.arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {config.arch!r}")
    if not (_is_int(config.scale) and config.scale in SCALES):
        raise ValueError(f"scale must be one of the integers {SCALES}, got {config.scale!r}")
    if not (_is_int(config.width) and 4 <= config.width <= 256):
        raise ValueError(f"width must be an integer in 4..256, got {config.width!r}")
    if not (_is_int(config.top_width) and (config.top_width == 0 or 4 <= config.top_width <= 256)):
        raise ValueError(f"top_width must be 0 or an integer in 4..256, got {config.top_width!r}")
    if not (_is_int(config.depth) and 0 <= config.depth <= 4):
        raise ValueError(f"depth must be an integer in 0..4, got {config.depth!r}")
    if not (_is_int(config.blocks) and 0 <= config.blocks <= 16):
        raise ValueError(f"blocks must be an integer in 0..16, got {config.blocks!r}")
    if not (config.top_blocks is None or (_is_int(config.top_blocks) and 0 <= config.top_blocks <= 16)):
        raise ValueError(f"top_blocks must be None or an integer in 0..16, got {config.top_blocks!r}")
    if not (isinstance(config.slope, (int, float)) and not isinstance(config.slope, bool) and 0.0 <= config.slope < 1.0):
        raise ValueError(f"slope must be a number in [0, 1), got {config.slope!r}")


class PadToMultiple(layers.Layer):
    """Replicates the bottom and right edges up to a multiple of ``multiple``."""

    def __init__(self, multiple: int, **kwargs):
        super().__init__(**kwargs)
        self.multiple = multiple

    def call(self, x):
        if self.multiple == 1:
            return x
        shape = ops.shape(x)
        pad_h = (self.multiple - shape[1] % self.multiple) % self.multiple
        pad_w = (self.multiple - shape[2] % self.multiple) % self.multiple
        x = ops.concatenate([x, ops.repeat(x[:, -1:], pad_h, axis=1)], axis=1)
        return ops.concatenate([x, ops.repeat(x[:, :, -1:], pad_w, axis=2)], axis=2)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "multiple": self.multiple}


class CropToInput(layers.Layer):
    """Crops the output back to ``scale`` times the original input size."""

    def __init__(self, scale: int, **kwargs):
        super().__init__(**kwargs)
        self.scale = scale

    def call(self, output, original):
        shape = ops.shape(original)
        return output[:, : shape[1] * self.scale, : shape[2] * self.scale, :]

    def compute_output_shape(self, output_shape, original_shape):
        def times(n):
            return None if n is None else n * self.scale

        return (output_shape[0], times(original_shape[1]), times(original_shape[2]), output_shape[3])

    def get_config(self):
        return {**super().get_config(), "scale": self.scale}


class DepthToSpace(layers.Layer):
    """Sub-pixel shuffle: ``(H, W, C*s*s)`` to ``(H*s, W*s, C)``."""

    def __init__(self, scale: int, **kwargs):
        super().__init__(**kwargs)
        self.scale = scale

    def call(self, x):
        return ops.depth_to_space(x, self.scale)

    def compute_output_shape(self, input_shape):
        def times(n):
            return None if n is None else n * self.scale

        return (input_shape[0], times(input_shape[1]), times(input_shape[2]), input_shape[3] // self.scale**2)

    def get_config(self):
        return {**super().get_config(), "scale": self.scale}


def _keys_cubic(x: np.ndarray) -> np.ndarray:
    ax = np.abs(x)
    return np.where(
        ax <= 1, 1.5 * ax**3 - 2.5 * ax**2 + 1, np.where(ax <= 2, -0.5 * ax**3 + 2.5 * ax**2 - 4 * ax + 2, 0.0)
    )


class BicubicUpsample(layers.Layer):
    """Fixed bicubic (Keys, a = -0.5) upsampling by an integer factor, edges replicated.

    Written as one constant 5x5 convolution producing the ``scale**2`` sub-pixel
    phases, then depth-to-space, so it works on inputs of unknown size on every
    backend (``ops.image.resize`` needs static sizes on TensorFlow).  With
    ``shuffle=False`` it returns the phases themselves, laid out as the sub-pixel
    head's, so the two can be added before one shared depth-to-space.
    """

    def __init__(self, scale: int, shuffle: bool = True, **kwargs):
        super().__init__(trainable=False, **kwargs)
        self.scale = scale
        self.shuffle = shuffle
        offsets = np.arange(-2, 3)
        phases = (np.arange(scale) + 0.5) / scale - 0.5  # source position of each output phase
        taps = _keys_cubic(offsets[None, :] - phases[:, None])
        taps /= taps.sum(axis=1, keepdims=True)
        kernel = np.zeros((5, 5, 3, 3 * scale * scale), dtype="float32")
        for ky in range(scale):
            for kx in range(scale):
                for c in range(3):
                    kernel[:, :, c, (ky * scale + kx) * 3 + c] = np.outer(taps[ky], taps[kx])
        self._kernel = kernel

    def call(self, x):
        top, bottom = x[:, :1], x[:, -1:]
        x = ops.concatenate([top, top, x, bottom, bottom], axis=1)
        left, right = x[:, :, :1], x[:, :, -1:]
        x = ops.concatenate([left, left, x, right, right], axis=2)
        kernel = ops.convert_to_tensor(self._kernel, dtype=x.dtype)
        phases = ops.conv(x, kernel, padding="valid")
        return ops.depth_to_space(phases, self.scale) if self.shuffle else phases

    def compute_output_shape(self, input_shape):
        if not self.shuffle:
            return (*input_shape[:3], input_shape[3] * self.scale**2)

        def times(n):
            return None if n is None else n * self.scale

        return (input_shape[0], times(input_shape[1]), times(input_shape[2]), input_shape[3])

    def get_config(self):
        return {**super().get_config(), "scale": self.scale, "shuffle": self.shuffle}


def _conv(x, filters, name, slope, activate=True):
    x = layers.Conv2D(filters, 3, padding="same", name=f"{name}_conv")(x)
    return layers.LeakyReLU(negative_slope=slope, name=f"{name}_lrelu")(x) if activate else x


def _residual_block(x, filters, name, slope):
    y = _conv(x, filters, f"{name}_a", slope)
    y = _conv(y, filters, f"{name}_b", slope, activate=False)
    return layers.Add(name=f"{name}_add")([x, y])


def _stage(x, level, name, config):
    filters = config.stage_width(level)
    x = _conv(x, filters, f"{name}_in", config.slope)
    for i in range(config.stage_blocks(level)):
        x = _residual_block(x, filters, f"{name}_res{i}", config.slope)
    return x


def _unet_body(x, config):
    skips = []
    for level in range(config.depth):
        x = _stage(x, level, f"enc{level}", config)
        skips.append(x)
        x = layers.MaxPooling2D(2, name=f"enc{level}_pool")(x)
    x = _stage(x, config.depth, "bottleneck", config)
    for level in reversed(range(config.depth)):
        filters = config.stage_width(level)
        x = layers.Conv2DTranspose(filters, 2, strides=2, name=f"dec{level}_up")(x)
        x = layers.LeakyReLU(negative_slope=config.slope, name=f"dec{level}_up_lrelu")(x)
        x = layers.Concatenate(name=f"dec{level}_concat")([x, skips[level]])
        x = _stage(x, level, f"dec{level}", config)
    return x


def build_model(config: ModelConfig) -> keras.Model:
    """Builds the model described by ``config`` for inputs of any size."""
    validate_config(config)
    s = config.scale
    lr = keras.Input(shape=(None, None, 3), name="lr")
    # The input and its bicubic base stay float32 under mixed precision: only the learned detail is rounded.
    if config.arch == "unet":
        x = PadToMultiple(config.multiple, name="pad", dtype="float32")(lr)
        features = _unet_body(x, config)
        detail = layers.Conv2D(3 * s * s, 3, padding="same", name="head_conv")(features)
        base = BicubicUpsample(s, shuffle=False, name="base_upsample", dtype="float32")(x)
        # Both are sub-pixel phases at the input resolution: one shuffle serves the sum.
        sr = layers.Add(name="residual_add", dtype="float32")([base, detail])
        sr = DepthToSpace(s, name="head_shuffle", dtype="float32")(sr)
    else:
        x = BicubicUpsample(s, name="pre_upsample", dtype="float32")(lr)
        x = PadToMultiple(config.multiple, name="pad", dtype="float32")(x)
        features = _unet_body(x, config)
        sr = layers.Conv2D(3, 3, padding="same", name="head_conv", dtype="float32")(features)
    sr = CropToInput(s, name="crop", dtype="float32")(sr, lr)
    return keras.Model(lr, sr, name=f"batchsr_{config.arch}_x{s}")
