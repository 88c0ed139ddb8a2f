"""The SelfAlign method: independent towers at retrieval time, scored by SelfAlign's final similarity.

Training needs nothing beyond the model's own outputs (global vectors, adapted locals, text mask,
re-normalised prototypes), which the method's loss (``losses.selfalign_loss``) reads; the forward
only checks that they are there. Retrieval packs each side into one vector (:func:`image_retrieval_vector`, :func:`text_retrieval_vector`):

  image: [g_i, c ctx_i, c mean_i]      text: [g_t, c mean_t, c ctx_t]      c = sqrt(0.5)

so that a plain dot product (exact or ScaNN search) equals the final similarity
``g_i.g_t + 0.5 (ctx_i.mean_t + mean_i.ctx_t)``. Hyper-parameters (``config.method``):

  similarity: 'final' (the packed vectors above) or 'global' (g_i.g_t only, the VSE++ base).
  pooling_temperature: temperature of the global-gated attention pooling the context vectors.

``z_joint`` (image+text records) is the normalised sum of the two vectors of the chosen similarity,
so all three outputs share one width and can be searched in one pool.
"""

import jax
import jax.numpy as jnp

from mmret import methods
from mmret.ops import NEG_INF, l2_normalize, masked_mean
from mmret.recipes.selfalign import losses

# The two partial similarities of the final score are weighted 0.5; packing splits it evenly.
CONTEXT_SCORE_WEIGHT = 0.5
SIMILARITIES = ("final", "global")
# Model outputs the selfalign loss reads from the training forward.
TRAIN_KEYS = ("z_image", "z_text", "image_tokens", "text_tokens", "text_mask")


def _masked_softmax(logits, mask):
  logits = jnp.where(mask, logits, NEG_INF)
  return jax.nn.softmax(logits, axis=-1) * mask


def context_vector(global_vec, locals_, mask=None, *, temperature=0.1):
  """Context of a sample: its locals pooled by attention gated by its own global vector.

  Weights = softmax over valid locals of cos(global, local) / temperature; the pooled vector is
  L2-normalised. Shapes: global [B,d], locals [B,T,d], mask [B,T] -> [B,d].
  """
  if mask is None:
    mask = jnp.ones(locals_.shape[:2], bool)
  locals_ = l2_normalize(locals_)
  gate = jnp.einsum("bd,btd->bt", l2_normalize(global_vec), locals_) / temperature
  weights = _masked_softmax(gate, mask)
  return l2_normalize(jnp.einsum("bt,btd->bd", weights, locals_))


def mean_local(locals_, mask=None):
  """L2-normalised mean of a sample's valid (L2-normalised) locals: [B,T,d] -> [B,d]."""
  if mask is None:
    mask = jnp.ones(locals_.shape[:2], bool)
  return l2_normalize(masked_mean(l2_normalize(locals_), mask))


def selfalign_similarity(
    z_image, image_tokens, z_text, text_tokens, text_mask, *, pooling_temperature=0.1
):
  """Final score matrix [images, texts]: g_i.g_t + 0.5 (ctx_i.mean_t + mean_i.ctx_t)."""
  ctx_i = context_vector(z_image, image_tokens, temperature=pooling_temperature)
  ctx_t = context_vector(z_text, text_tokens, text_mask, temperature=pooling_temperature)
  mean_i, mean_t = mean_local(image_tokens), mean_local(text_tokens, text_mask)
  return z_image @ z_text.T + CONTEXT_SCORE_WEIGHT * (ctx_i @ mean_t.T + mean_i @ ctx_t.T)


def image_retrieval_vector(z_image, image_tokens, *, pooling_temperature=0.1):
  """[g_i, c*ctx_i, c*mean_i], c = sqrt(0.5): its dot with the text vector is the final score."""
  c = CONTEXT_SCORE_WEIGHT**0.5
  ctx = context_vector(z_image, image_tokens, temperature=pooling_temperature)
  return jnp.concatenate([z_image, c * ctx, c * mean_local(image_tokens)], axis=-1)


def text_retrieval_vector(z_text, text_tokens, text_mask, *, pooling_temperature=0.1):
  """[g_t, c*mean_t, c*ctx_t] with c = sqrt(0.5), the partner of :func:`image_retrieval_vector`."""
  c = CONTEXT_SCORE_WEIGHT**0.5
  ctx = context_vector(z_text, text_tokens, text_mask, temperature=pooling_temperature)
  return jnp.concatenate([z_text, c * mean_local(text_tokens, text_mask), c * ctx], axis=-1)


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

  def forward(params, frozen, batch, *, rng, step, axis_name=None, example_index=None):
    del frozen, step
    keys = methods.example_keys(
        rng, methods.batch_size(batch), axis_name=axis_name, index=example_index
    )
    outputs = methods.apply_model(model, params, methods.model_inputs(batch), train=True, keys=keys)
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


SELFALIGN = methods.Method(
    make_forward=make_forward,
    make_predict=make_predict,
    loss=losses.selfalign_loss,
    per_example_forward=True,  # the towers run each example alone; only the loss couples them
)
