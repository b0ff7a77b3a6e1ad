"""Flax models of the standard task mix: their sizes differ by orders of magnitude on purpose.

GroupNorm stands where a ResNet would usually have BatchNorm: batch statistics are a
known problem in federated averaging (Hsieh et al., 2020), so the built-in models are pure
``params -> logits`` functions. Models of your own may still use BatchNorm or Dropout: a
:class:`~mtfl_jax.tasks.Task` takes their mutable collections and rng streams.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp


class MLP(nn.Module):
  """Multi-layer perceptron on flattened inputs."""
  features: Sequence[int] = (128, 64)
  num_classes: int = 10

  @nn.compact
  def __call__(self, x):
    x = x.reshape((x.shape[0], -1))
    for f in self.features:
      x = nn.relu(nn.Dense(f)(x))
    return nn.Dense(self.num_classes)(x)


class LeNet5(nn.Module):
  """LeNet-5 (LeCun et al., 1998) for 28x28 grey images: conv 6@5x5 (same), pool, conv 16@5x5, pool, 120, 84."""
  num_classes: int = 10

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(6, (5, 5), padding="SAME")(x))
    x = nn.avg_pool(x, (2, 2), (2, 2))
    x = nn.relu(nn.Conv(16, (5, 5), padding="VALID")(x))
    x = nn.avg_pool(x, (2, 2), (2, 2))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(120)(x))
    x = nn.relu(nn.Dense(84)(x))
    return nn.Dense(self.num_classes)(x)


class _ResBlock(nn.Module):
  features: int
  strides: int = 1

  @nn.compact
  def __call__(self, x):
    y = nn.Conv(self.features, (3, 3), (self.strides, self.strides), use_bias=False)(x)
    y = nn.relu(nn.GroupNorm(num_groups=min(8, self.features))(y))
    y = nn.Conv(self.features, (3, 3), use_bias=False)(y)
    y = nn.GroupNorm(num_groups=min(8, self.features))(y)
    if x.shape[-1] != self.features or self.strides != 1:
      x = nn.Conv(self.features, (1, 1), (self.strides, self.strides), use_bias=False)(x)
    return nn.relu(x + y)


class ResNet(nn.Module):
  """CIFAR-style ResNet (He et al., 2016): 6n+2 layers; ``blocks_per_stage=1`` is ResNet-8."""
  blocks_per_stage: int = 1
  widths: Sequence[int] = (16, 32, 64)
  num_classes: int = 10

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(self.widths[0], (3, 3), use_bias=False)(x)
    x = nn.relu(nn.GroupNorm(num_groups=min(8, self.widths[0]))(x))
    for stage, width in enumerate(self.widths):
      for block in range(self.blocks_per_stage):
        x = _ResBlock(width, 2 if (stage > 0 and block == 0) else 1)(x)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes)(x)


class UNet(nn.Module):
  """Small U-Net (Ronneberger et al., 2015): per-pixel class logits of the input's size.

  Every 3x3 convolution is followed by GroupNorm, as in :class:`ResNet`. Without it the
  deep path (the pooled levels, whose receptive field covers a whole shape) starts with
  activations several times smaller than the shallow skip path and gets far smaller
  relative gradients, so training first settles on what the skip path alone can tell,
  foreground from background by brightness, and only tells the shape classes apart
  epochs later (many federated rounds); normalised, every level learns from the start.
  """
  widths: Sequence[int] = (16, 32, 64)
  num_classes: int = 4

  @nn.compact
  def __call__(self, x):
    def conv(width, x):
      x = nn.Conv(width, (3, 3), use_bias=False)(x)
      return nn.relu(nn.GroupNorm(num_groups=min(8, width))(x))

    skips = []
    for w in self.widths[:-1]:
      x = conv(w, conv(w, x))
      skips.append(x)
      x = nn.max_pool(x, (2, 2), (2, 2))
    x = conv(self.widths[-1], x)
    for w, skip in zip(reversed(self.widths[:-1]), reversed(skips)):
      x = nn.ConvTranspose(w, (2, 2), (2, 2))(x)
      x = conv(w, jnp.concatenate([x, skip], axis=-1))
    return nn.Conv(self.num_classes, (1, 1))(x)
