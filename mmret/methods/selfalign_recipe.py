"""The SelfAlign method: independent towers at retrieval time, scored by SelfAlign's final similarity.

Training needs nothing beyond the model's own outputs (global vectors, adapted locals, text mask,
re-normalised prototypes), which the ``selfalign`` loss reads; the forward only checks that they
are there. Retrieval packs each side into one vector (see ``mmret.losses.selfalign``):

  image: [g_i, c ctx_i, c mean_i]      text: [g_t, c mean_t, c ctx_t]      c = sqrt(0.5)

so that a plain dot product (exact or ScaNN search) equals the final similarity
``g_i.g_t + 0.5 (ctx_i.mean_t + mean_i.ctx_t)``. Hyper-parameters (``config.method``):

  similarity: 'final' (the packed vectors above) or 'global' (g_i.g_t only, the VSE++ base).
  pooling_temperature: temperature of the global-gated attention pooling the context vectors.

``z_joint`` (image+text records) is the normalised sum of the two vectors of the chosen similarity,
so all three outputs share one width and can be searched in one pool.
"""

from mmret import methods
from mmret.losses.selfalign import image_retrieval_vector, l2_normalize, text_retrieval_vector

SIMILARITIES = ("final", "global")
# Model outputs the selfalign loss reads from the training forward.
TRAIN_KEYS = ("z_image", "z_text", "image_tokens", "text_tokens", "text_mask")


def _check_hparams(similarity, pooling_temperature):
  if similarity not in SIMILARITIES:
    raise ValueError(f"method.similarity must be one of {SIMILARITIES}, got {similarity!r}")
  if not pooling_temperature > 0:
    raise ValueError(f"method.pooling_temperature must be > 0, got {pooling_temperature!r}")


def _check_model(model):
  # The final similarity pairs each tower's global vector with its own locals: the model must keep
  # the towers independent (no joint encoder producing the unimodal embeddings).
  if model.unimodal != "tower":
    raise ValueError(f"the selfalign method needs model.unimodal='tower', got {model.unimodal!r}")


def make_forward(model, *, similarity="final", pooling_temperature=0.1):
  """Training forward: the model's outputs, checked to hold what the selfalign loss reads."""
  _check_hparams(similarity, pooling_temperature)
  _check_model(model)

  def forward(params, frozen, batch, *, rng, step):
    del frozen, step
    outputs = model.apply({"params": params}, batch, train=True, rngs={"dropout": rng})
    missing = [key for key in TRAIN_KEYS if key not in outputs]
    if missing:
      raise KeyError(
          f"selfalign training needs image and text inputs; the model returned no "
          f"{missing} (batch keys: {sorted(batch)})"
      )
    return outputs

  return forward


def retrieval_outputs(outputs, *, similarity="final", pooling_temperature=0.1):
  """Model outputs -> outputs whose z_image / z_text / z_joint are the retrieval vectors."""
  _check_hparams(similarity, pooling_temperature)
  if similarity == "global":
    return outputs
  out = dict(outputs)
  if "z_image" in outputs:
    out["z_image"] = image_retrieval_vector(
        outputs["z_image"], outputs["image_tokens"], pooling_temperature=pooling_temperature
    )
  if "z_text" in outputs:
    out["z_text"] = text_retrieval_vector(
        outputs["z_text"],
        outputs["text_tokens"],
        outputs["text_mask"],
        pooling_temperature=pooling_temperature,
    )
  if "z_image" in outputs and "z_text" in outputs:
    out["z_joint"] = l2_normalize(out["z_image"] + out["z_text"])
  return out


def make_predict(model, *, similarity="final", pooling_temperature=0.1):
  """Inference: retrieval vectors whose dot product is the chosen similarity."""
  _check_hparams(similarity, pooling_temperature)
  _check_model(model)

  def predict(params, batch):
    outputs = model.apply({"params": params}, batch, train=False)
    return retrieval_outputs(
        outputs, similarity=similarity, pooling_temperature=pooling_temperature
    )

  return predict


def init_frozen(model, params, **hparams):
  del model, params, hparams
  return {}


SELFALIGN = methods.register(
    "selfalign",
    methods.Method(make_forward=make_forward, make_predict=make_predict, init_frozen=init_frozen),
)
