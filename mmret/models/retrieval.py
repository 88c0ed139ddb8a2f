"""The retrieval model: image and text towers, adapters into a shared width, and a joint embedding.

Output contract (every method reads these keys; a key is absent when its input is):
  z_image, z_text, z_joint   [B,d] L2-normalised embeddings for the three modalities
  image_tokens [B,P,d], text_tokens [B,L,d]   adapted local features in the shared width
  text_mask [B,L]            True on real text tokens
  logit_scale                log of the contrastive inverse temperature (learnable)
  prototypes [K,d]           L2-normalised learnable prototypes (when num_prototypes > 0)
The last two are shared by the whole batch (``SHARED_OUTPUTS``); every other output has one row
per example.
"""

import math

import flax.linen as nn
import jax.numpy as jnp

from mmret.models import sizes
from mmret.models.bert import BertEncoder
from mmret.models.efficientnet import EfficientNetLite0
from mmret.models.joint import JointEncoder
from mmret.models.layers import Dtype
from mmret.models.text import TextTransformer
from mmret.models.vit import ViT
from mmret.ops import l2_normalize

SHARED_OUTPUTS = ("logit_scale", "prototypes")
# Batch keys holding a frozen tower's cached outputs (``mmret.feature_cache``), which stand in for
# the pixels / token ids the tower would read: raw tower outputs, before projection and adapter.
IMAGE_FEATURES = {"pooled": "image_tower_pooled", "tokens": "image_tower_tokens"}
TEXT_FEATURES = {"pooled": "text_tower_pooled", "tokens": "text_tower_tokens"}


def image_input(batch: dict):
  """What ``encode_image`` reads from ``batch``: its cached tower outputs if it carries them
  (``{'pooled', 'tokens'}``), else the pixels; None when the batch has no image."""
  if IMAGE_FEATURES["tokens"] in batch:
    return {name: batch[key] for name, key in IMAGE_FEATURES.items()}
  return batch.get("image")


def text_input(batch: dict):
  """What ``encode_text`` reads as text: cached tower outputs or token ids; None without text."""
  if TEXT_FEATURES["tokens"] in batch:
    return {name: batch[key] for name, key in TEXT_FEATURES.items()}
  return batch.get("text_ids")


class Adapter(nn.Module):
  """Maps tower tokens into the shared width: 'linear' or a 2-layer 'mlp' (SOLAR's adapter)."""

  width: int
  kind: str = "linear"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    if self.kind == "linear":
      return nn.Dense(self.width, dtype=self.dtype, name="proj")(x)
    if self.kind == "mlp":
      x = nn.gelu(nn.Dense(self.width, dtype=self.dtype, name="fc1")(x), approximate=False)
      return nn.Dense(self.width, dtype=self.dtype, name="fc2")(x)
    raise ValueError(f"adapter kind must be 'linear' or 'mlp', got {self.kind!r}")


def image_tower(cfg: dict, dtype) -> nn.Module:
  """The image tower named by ``cfg['kind']``: 'vit' (default) or 'efficientnet_lite0'.

  The convolutional tower has a fixed architecture: it reads only ``pool`` and ``dropout``.
  """
  cfg = dict(cfg)
  kind = cfg.pop("kind", None) or "vit"
  if kind == "vit":
    return ViT(**cfg, dtype=dtype)
  if kind == "efficientnet_lite0":
    return EfficientNetLite0(
        pool=cfg.get("pool", "gap"), dropout=cfg.get("dropout", 0.0), dtype=dtype
    )
  raise ValueError(f"model.image.kind must be 'vit' or 'efficientnet_lite0', got {kind!r}")


def text_tower(cfg: dict, vocab_size: int, max_len: int, dtype) -> nn.Module:
  """The text tower named by ``cfg['kind']``: 'transformer' (pre-LN, default) or 'bert'."""
  cfg = dict(cfg)
  kind = cfg.pop("kind", None) or "transformer"
  towers = {"transformer": TextTransformer, "bert": BertEncoder}
  if kind not in towers:
    raise ValueError(f"model.text.kind must be 'transformer' or 'bert', got {kind!r}")
  return towers[kind](vocab_size=vocab_size, max_len=max_len, **cfg, dtype=dtype)


class RetrievalModel(nn.Module):
  image: dict
  text: dict
  joint: dict
  embed_dim: int
  vocab_size: int
  max_text_len: int
  joint_kind: str = "fusion"  # 'fusion': normalise(z_image + z_text); 'encoder': JointEncoder CLS
  unimodal: str = "tower"  # 'tower': pooled tower output; 'joint': JointEncoder fed one modality
  adapter: str = "linear"
  num_prototypes: int = 0  # SelfAlign's concept prototypes (0 = none)
  temperature_init: float = 0.07
  max_logit_scale: float = math.log(100.0)
  dtype: Dtype = jnp.float32

  def setup(self):
    if self.joint_kind not in ("fusion", "encoder"):
      raise ValueError(f"model.joint_kind must be 'fusion' or 'encoder', got {self.joint_kind!r}")
    if self.unimodal not in ("tower", "joint"):
      raise ValueError(f"model.unimodal must be 'tower' or 'joint', got {self.unimodal!r}")
    self.image_tower = image_tower(self.image, self.dtype)
    self.text_tower = text_tower(self.text, self.vocab_size, self.max_text_len, self.dtype)
    self.image_proj = nn.Dense(self.embed_dim, use_bias=False, dtype=self.dtype)
    self.text_proj = nn.Dense(self.embed_dim, use_bias=False, dtype=self.dtype)
    self.image_adapter = Adapter(self.embed_dim, self.adapter, self.dtype)
    self.text_adapter = Adapter(self.embed_dim, self.adapter, self.dtype)
    if self.joint_kind == "encoder" or self.unimodal == "joint":
      self.joint_encoder = JointEncoder(**self.joint, dtype=self.dtype)
      self.joint_proj = nn.Dense(self.embed_dim, use_bias=False, dtype=self.dtype)
    self.logit_scale = self.param(
        "logit_scale", nn.initializers.constant(math.log(1.0 / self.temperature_init)), ()
    )
    if self.num_prototypes:
      self.prototypes = self.param(
          "prototypes", nn.initializers.normal(1.0), (self.num_prototypes, self.embed_dim)
      )

  def encode_image(self, image, *, train=False):
    """Tower pass: dict(image_global=[B,d] unnormalised, image_tokens=[B,P,d]).

    ``image``: pixels [B,H,W,3], or the tower's cached outputs ``{'pooled', 'tokens'}``
    (:func:`image_input`), which skip the tower.
    """
    out = image if isinstance(image, dict) else self.image_tower(image, train=train)
    return {
        "image_global": self.image_proj(out["pooled"]),
        "image_tokens": self.image_adapter(out["tokens"]),
    }

  def encode_text(self, text_ids, text_mask, *, train=False):
    """Like :meth:`encode_image`: ``text_ids`` [B,L] or the cached ``{'pooled', 'tokens'}``."""
    if isinstance(text_ids, dict):
      out = text_ids
    else:
      out = self.text_tower(text_ids, text_mask, train=train)
    return {
        "text_global": self.text_proj(out["pooled"]),
        "text_tokens": self.text_adapter(out["tokens"]),
    }

  def encode_joint(
      self,
      image_tokens=None,
      text_tokens=None,
      text_mask=None,
      *,
      image_weights=None,
      text_weights=None,
      train=False,
  ):
    """Normalised joint embedding [B,d] of the given token sets under attention weights."""
    cls = self.joint_encoder(
        image_tokens,
        text_tokens,
        text_mask,
        image_weights=image_weights,
        text_weights=text_weights,
        train=train,
    )
    return l2_normalize(self.joint_proj(cls))

  def __call__(self, batch, *, train=False, image_weights=None, text_weights=None):
    out = {"logit_scale": jnp.minimum(self.logit_scale, self.max_logit_scale)}
    if self.num_prototypes:
      out["prototypes"] = l2_normalize(self.prototypes)  # re-normalised at every step
    image, text = image_input(batch), text_input(batch)
    has_image, has_text = image is not None, text is not None
    if has_image:
      out.update(self.encode_image(image, train=train))
    if has_text:
      out.update(self.encode_text(text, batch["text_mask"], train=train))
      out["text_mask"] = batch["text_mask"]
    if self.unimodal == "joint":
      if has_image:
        out["z_image"] = self.encode_joint(
            out["image_tokens"], image_weights=image_weights, train=train
        )
      if has_text:
        out["z_text"] = self.encode_joint(
            text_tokens=out["text_tokens"],
            text_mask=batch["text_mask"],
            text_weights=text_weights,
            train=train,
        )
    else:
      if has_image:
        out["z_image"] = l2_normalize(out["image_global"])
      if has_text:
        out["z_text"] = l2_normalize(out["text_global"])
    if has_image and has_text:
      if self.joint_kind == "encoder":
        out["z_joint"] = self.encode_joint(
            out["image_tokens"],
            out["text_tokens"],
            batch["text_mask"],
            image_weights=image_weights,
            text_weights=text_weights,
            train=train,
        )
      else:
        out["z_joint"] = l2_normalize(out["z_image"] + out["z_text"])
    return out


def build_model(model_cfg, *, vocab_size: int, max_text_len: int) -> RetrievalModel:
  """RetrievalModel from ``config.model`` (size + overrides) and the tokenizer's vocabulary."""
  arch = sizes.resolve(model_cfg)
  dtypes = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
  if model_cfg.dtype not in dtypes:
    raise ValueError(f"model.dtype must be one of {sorted(dtypes)}, got {model_cfg.dtype!r}")
  image = dict(arch["image"], pool=model_cfg.image_pool, dropout=model_cfg.dropout)
  text = dict(
      arch["text"],
      pool=model_cfg.text_pool,
      causal=model_cfg.text_causal,
      dropout=model_cfg.dropout,
  )
  joint = dict(arch["joint"], dropout=model_cfg.dropout)
  return RetrievalModel(
      image=image,
      text=text,
      joint=joint,
      embed_dim=arch["embed_dim"],
      vocab_size=vocab_size,
      max_text_len=max_text_len,
      joint_kind=model_cfg.joint_kind,
      unimodal=model_cfg.unimodal,
      adapter=model_cfg.adapter,
      num_prototypes=model_cfg.num_prototypes,
      temperature_init=model_cfg.temperature_init,
      dtype=dtypes[model_cfg.dtype],
  )
