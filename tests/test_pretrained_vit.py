"""ViT and DINOv2 checkpoints (Hugging Face layouts) reproduce transformers' ViTModel/Dinov2Model.

Small models with random weights, saved to disk and converted: the final-LayerNorm class token
(mmret's pooled output, through the identity image projection) equal to 1e-5 absolute, and all
patch tokens equal too. At another image size the position grid is interpolated with the same
bicubic weights as transformers' ``interpolate_pos_encoding`` (outputs equal to 1e-5 again).
"""

import jax
import numpy as np
import torch
import transformers

from mmret import config_lib
from mmret.models import pretrained
from mmret.models.retrieval import build_model

ATOL = 1e-5


def _image_model(patch, image_size, *, ln_eps, layer_scale=False):
  cfg = config_lib.model_config("tiny")
  cfg.image.update(
      width=32,
      depth=2,
      heads=2,
      mlp_dim=128,
      patch_size=patch,
      ln_eps=ln_eps,
      layer_scale=layer_scale,
  )
  cfg.embed_dim = 32
  model = build_model(cfg, vocab_size=10, max_text_len=4)
  images = np.zeros((1, image_size, image_size, 3), np.float32)
  return model, jax.jit(model.init)(jax.random.PRNGKey(0), {"image": images})["params"]


def _compare(model, params, reference, images):
  with torch.no_grad():
    hidden = reference(
        pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2))
    ).last_hidden_state.numpy()
  tower = jax.jit(lambda p, x: model.apply({"params": p}, x, method=lambda m, y: m.image_tower(y)))(
      params, images
  )
  np.testing.assert_allclose(tower["pooled"], hidden[:, 0], atol=ATOL)
  np.testing.assert_allclose(tower["tokens"], hidden[:, 1:], atol=ATOL)
  z = np.asarray(jax.jit(model.apply)({"params": params}, {"image": images})["z_image"])
  np.testing.assert_allclose(
      z, hidden[:, 0] / np.linalg.norm(hidden[:, 0], axis=-1, keepdims=True), atol=ATOL
  )


def _images(size, n=2):
  return np.random.default_rng(0).normal(size=(n, size, size, 3)).astype(np.float32)


def test_vit_matches_transformers(tmp_path):
  torch.manual_seed(0)
  reference = transformers.ViTModel(
      transformers.ViTConfig(
          hidden_size=32,
          num_hidden_layers=2,
          num_attention_heads=2,
          intermediate_size=128,
          image_size=32,
          patch_size=8,
      )
  ).eval()
  reference.save_pretrained(tmp_path / "vit")
  model, params = _image_model(8, 32, ln_eps=1e-12)
  params = pretrained.load_into(params, f"vit:{tmp_path / 'vit'}")
  _compare(model, params, reference, _images(32))


def test_dinov2_matches_transformers(tmp_path):
  torch.manual_seed(0)
  reference = transformers.Dinov2Model(
      transformers.Dinov2Config(
          hidden_size=32,
          num_hidden_layers=2,
          num_attention_heads=2,
          mlp_ratio=4,
          image_size=28,
          patch_size=14,
          layerscale_value=0.5,
      )
  ).eval()
  with torch.no_grad():  # distinct per-channel layer scales
    for name, p in reference.named_parameters():
      if "lambda1" in name:
        p.add_(0.1 * torch.randn_like(p))
  reference.save_pretrained(tmp_path / "dinov2")
  model, params = _image_model(14, 28, ln_eps=1e-6, layer_scale=True)
  params = pretrained.load_into(params, f"vit:{tmp_path / 'dinov2'}")
  _compare(model, params, reference, _images(28))


def test_position_grid_is_interpolated_like_transformers(tmp_path):
  torch.manual_seed(0)
  reference = transformers.ViTModel(
      transformers.ViTConfig(
          hidden_size=32,
          num_hidden_layers=2,
          num_attention_heads=2,
          intermediate_size=128,
          image_size=32,
          patch_size=8,
      )
  ).eval()
  reference.save_pretrained(tmp_path / "vit")
  model, params = _image_model(8, 48, ln_eps=1e-12)  # 6x6 patches instead of 4x4
  params = pretrained.load_into(params, f"vit:{tmp_path / 'vit'}")
  assert params["image_tower"]["pos_embed"].shape == (1, 37, 32)
  images = _images(48)
  with torch.no_grad():
    hidden = reference(
        pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2)), interpolate_pos_encoding=True
    ).last_hidden_state.numpy()
  tower = jax.jit(lambda p, x: model.apply({"params": p}, x, method=lambda m, y: m.image_tower(y)))(
      params, images
  )
  np.testing.assert_allclose(tower["pooled"], hidden[:, 0], atol=ATOL)
  np.testing.assert_allclose(tower["tokens"], hidden[:, 1:], atol=ATOL)
