"""EfficientNet-Lite0 image tower (convolutional; ReLU6, no squeeze-excite, TF 'SAME' padding).

Tokens are the cells of the last feature map ([B, h*w, 1280] after the 1x1 head conv) and the
pooled vector their mean, the input of the ImageNet classifier.

BatchNorm layers are per-channel affine maps (``scale``, ``bias``): the converter folds the
checkpoint's running statistics into them, so the train state holds parameters only and
fine-tuning behaves like training with frozen BatchNorm statistics (as detection backbones do).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmret.models.layers import Dtype, check_pixels_normalized

# (repeats, kernel, first stride, expand ratio, output channels) per stage, from the reference
# efficientnet_lite_builder (lite0: width and depth multipliers 1.0).
LITE0_STAGES = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280


class Affine(nn.Module):
  """y = x * scale + bias per channel: an inference-mode BatchNorm with folded statistics."""

  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,))
    bias = self.param("bias", nn.initializers.zeros, (c,))
    return x * scale.astype(self.dtype) + bias.astype(self.dtype)


class MBConv(nn.Module):
  """Inverted residual: [1x1 expand] -> depthwise kxk -> 1x1 project, residual when shapes agree."""

  out_channels: int
  kernel: int
  stride: int
  expand: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    in_channels = x.shape[-1]
    conv = lambda c, k, name, **kw: nn.Conv(
        c, (k, k), padding="SAME", use_bias=False, dtype=self.dtype, name=name, **kw  # noqa: E731
    )
    y = x
    hidden = in_channels * self.expand
    if self.expand != 1:
      y = jax.nn.relu6(Affine(self.dtype, name="expand_bn")(conv(hidden, 1, "expand")(y)))
    y = conv(
        hidden, self.kernel, "depthwise", strides=(self.stride,) * 2, feature_group_count=hidden
    )(y)
    y = jax.nn.relu6(Affine(self.dtype, name="depthwise_bn")(y))
    y = Affine(self.dtype, name="project_bn")(conv(self.out_channels, 1, "project")(y))
    if self.stride == 1 and in_channels == self.out_channels:
      y = y + x
    return y


class EfficientNetLite0(nn.Module):
  pool: str = "gap"
  dropout: float = 0.0  # unused: the convolutional tower has no dropout (kept for a uniform API)
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    """images [B,H,W,3] float -> dict(tokens=[B,h*w,1280], pooled=[B,1280])."""
    del train
    check_pixels_normalized(images)
    if self.pool != "gap":
      raise ValueError(
          "the efficientnet_lite0 image tower has no class token; set "
          f"model.image_pool='gap' (got {self.pool!r})"
      )
    x = nn.Conv(
        STEM_CHANNELS,
        (3, 3),
        strides=(2, 2),
        padding="SAME",
        use_bias=False,
        dtype=self.dtype,
        name="stem",
    )(images.astype(self.dtype))
    x = jax.nn.relu6(Affine(self.dtype, name="stem_bn")(x))
    index = 0
    for repeats, kernel, stride, expand, channels in LITE0_STAGES:
      for r in range(repeats):
        x = MBConv(
            channels, kernel, stride if r == 0 else 1, expand, self.dtype, name=f"block{index}"
        )(x)
        index += 1
    x = nn.Conv(HEAD_CHANNELS, (1, 1), use_bias=False, dtype=self.dtype, name="head")(x)
    x = jax.nn.relu6(Affine(self.dtype, name="head_bn")(x))
    b, h, w, c = x.shape
    tokens = x.reshape(b, h * w, c)
    return {"tokens": tokens, "pooled": tokens.mean(axis=1)}
