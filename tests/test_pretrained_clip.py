"""CLIP checkpoints (Hugging Face and OpenAI/open_clip layouts) reproduce transformers' CLIPModel.

A small CLIPModel with random weights is saved to disk, converted through ``model.init`` and
compared output for output: projected (unnormalised) image and text features to 1e-5 absolute
(about 1e-6 seen, features of magnitude ~2). The OpenAI layout is tested on the same weights
renamed, as a torch state dict (open_clip) and as a TorchScript archive (OpenAI's releases).
"""

import jax
import numpy as np
import pytest
import torch
import transformers

from mmret import config_lib
from mmret.models import pretrained
from mmret.models.retrieval import RetrievalModel, build_model

ATOL = 1e-5
VOCAB, EOS, MAX_POS, TEXT_LEN, IMAGE = 100, 99, 16, 12, 32


@pytest.fixture(scope="module")
def reference():
  torch.manual_seed(0)
  config = transformers.CLIPConfig(
      text_config=dict(
          hidden_size=48,
          num_hidden_layers=2,
          num_attention_heads=2,
          intermediate_size=96,
          vocab_size=VOCAB,
          max_position_embeddings=MAX_POS,
          bos_token_id=98,
          eos_token_id=EOS,
          pad_token_id=0,
      ),
      vision_config=dict(
          hidden_size=32,
          num_hidden_layers=2,
          num_attention_heads=2,
          intermediate_size=64,
          image_size=IMAGE,
          patch_size=8,
      ),
      projection_dim=24,
      logit_scale_init_value=3.0,
  )
  model = transformers.CLIPModel(config).eval()
  with torch.no_grad():  # random, non-trivial LayerNorm affine parameters
    for name, p in model.named_parameters():
      if "norm" in name:
        p.add_(0.1 * torch.randn_like(p))
  return model


def _mmret_model():
  cfg = config_lib.model_config("tiny")
  cfg.image.update(
      width=32,
      depth=2,
      heads=2,
      mlp_dim=64,
      patch_size=8,
      ln_pre=True,
      activation="quick_gelu",
      ln_eps=1e-5,
  )
  cfg.text.update(width=48, depth=2, heads=2, mlp_dim=96, activation="quick_gelu", ln_eps=1e-5)
  cfg.update(embed_dim=24, text_causal=True, text_pool="eos", image_pool="cls")
  return build_model(cfg, vocab_size=VOCAB, max_text_len=TEXT_LEN)


def _inputs():
  rng = np.random.default_rng(0)
  images = rng.normal(size=(3, IMAGE, IMAGE, 3)).astype(np.float32)
  lengths = np.array([3, 7, TEXT_LEN])
  ids = rng.integers(1, 97, size=(3, TEXT_LEN)).astype(np.int32)
  ids[:, 0] = 98
  mask = np.arange(TEXT_LEN)[None] < lengths[:, None]
  ids[np.arange(3), lengths - 1] = EOS
  ids = np.where(mask, ids, 0).astype(np.int32)
  return images, ids, mask


def _features(out):
  return (out.pooler_output if hasattr(out, "pooler_output") else out).detach().numpy()


def _reference_outputs(model, images, ids, mask):
  with torch.no_grad():
    image = model.get_image_features(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2)))
    text = model.get_text_features(
        input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long()
    )
  return _features(image), _features(text)


def _mmret_outputs(spec):
  model = _mmret_model()
  images, ids, mask = _inputs()
  params = jax.jit(model.init)(
      jax.random.PRNGKey(1), {"image": images, "text_ids": ids, "text_mask": mask}
  )["params"]
  params = pretrained.load_into(params, spec)
  image, text = jax.jit(
      lambda p: (
          model.apply({"params": p}, images, method=RetrievalModel.encode_image),
          model.apply({"params": p}, ids, mask, method=RetrievalModel.encode_text),
      )
  )(params)
  return params, np.asarray(image["image_global"]), np.asarray(text["text_global"])


def _to_openai_layout(state):
  """The same weights under OpenAI / open_clip names (fused q/k/v, [in, out] projections)."""
  out = {}
  for tower, src, dst in (
      ("vision", "vision_model.encoder.layers", "visual.transformer.resblocks"),
      ("text", "text_model.encoder.layers", "transformer.resblocks"),
  ):
    depth = len({k.split(".")[3] for k in state if k.startswith(src + ".")})
    for i in range(depth):
      s, d = f"{src}.{i}", f"{dst}.{i}"
      for part in ("weight", "bias"):
        out[f"{d}.attn.in_proj_{part}"] = torch.cat(
            [state[f"{s}.self_attn.{p}_proj.{part}"] for p in "qkv"]
        )
        out[f"{d}.attn.out_proj.{part}"] = state[f"{s}.self_attn.out_proj.{part}"]
        out[f"{d}.ln_1.{part}"] = state[f"{s}.layer_norm1.{part}"]
        out[f"{d}.ln_2.{part}"] = state[f"{s}.layer_norm2.{part}"]
        out[f"{d}.mlp.c_fc.{part}"] = state[f"{s}.mlp.fc1.{part}"]
        out[f"{d}.mlp.c_proj.{part}"] = state[f"{s}.mlp.fc2.{part}"]
  for part in ("weight", "bias"):
    out[f"visual.ln_pre.{part}"] = state[f"vision_model.pre_layrnorm.{part}"]
    out[f"visual.ln_post.{part}"] = state[f"vision_model.post_layernorm.{part}"]
    out[f"ln_final.{part}"] = state[f"text_model.final_layer_norm.{part}"]
  e = "vision_model.embeddings"
  out["visual.conv1.weight"] = state[f"{e}.patch_embedding.weight"]
  out["visual.class_embedding"] = state[f"{e}.class_embedding"]
  out["visual.positional_embedding"] = state[f"{e}.position_embedding.weight"]
  out["visual.proj"] = state["visual_projection.weight"].T.contiguous()
  out["token_embedding.weight"] = state["text_model.embeddings.token_embedding.weight"]
  out["positional_embedding"] = state["text_model.embeddings.position_embedding.weight"]
  out["text_projection"] = state["text_projection.weight"].T.contiguous()
  out["logit_scale"] = state["logit_scale"]
  return out


def test_hf_layout_matches_transformers(reference, tmp_path):
  reference.save_pretrained(tmp_path / "clip")
  params, image, text = _mmret_outputs(f"clip:{tmp_path / 'clip'}")
  ref_image, ref_text = _reference_outputs(reference, *_inputs())
  np.testing.assert_allclose(image, ref_image, atol=ATOL)
  np.testing.assert_allclose(text, ref_text, atol=ATOL)
  np.testing.assert_allclose(params["logit_scale"], reference.logit_scale.item(), atol=1e-6)


def _torchscript_archive(state, path):
  """Saves ``state`` as a TorchScript archive, the format of OpenAI's CLIP releases."""
  root = torch.nn.Module()
  for name, tensor in state.items():
    *parents, leaf = name.split(".")
    module = root
    for part in parents:
      if not hasattr(module, part):
        module.add_module(part, torch.nn.Module())
      module = getattr(module, part)
    module.register_parameter(leaf, torch.nn.Parameter(tensor.clone(), requires_grad=False))
  torch.jit.script(root).save(str(path))


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("file_format", ["state_dict", "torchscript"])
def test_openai_layout_matches_transformers(reference, tmp_path, file_format):
  path = tmp_path / "openai_clip.pt"
  state = _to_openai_layout(reference.state_dict())
  if file_format == "torchscript":
    _torchscript_archive(state, path)
  else:
    torch.save(state, path)
  _, image, text = _mmret_outputs(f"clip:{path}")
  ref_image, ref_text = _reference_outputs(reference, *_inputs())
  np.testing.assert_allclose(image, ref_image, atol=ATOL)
  np.testing.assert_allclose(text, ref_text, atol=ATOL)


def test_one_tower_of_a_clip_checkpoint(reference, tmp_path):
  reference.save_pretrained(tmp_path / "clip")
  model = _mmret_model()
  images, ids, mask = _inputs()
  init = jax.jit(model.init)(
      jax.random.PRNGKey(1), {"image": images, "text_ids": ids, "text_mask": mask}
  )["params"]
  params = pretrained.load_into(init, f"clip:{tmp_path / 'clip'}@image")
  np.testing.assert_array_equal(params["text_tower"]["pos_embed"], init["text_tower"]["pos_embed"])
  np.testing.assert_array_equal(params["logit_scale"], init["logit_scale"])
  image = jax.jit(lambda p: model.apply({"params": p}, images, method=RetrievalModel.encode_image))(
      params
  )
  np.testing.assert_allclose(
      image["image_global"], _reference_outputs(reference, images, ids, mask)[0], atol=ATOL
  )
