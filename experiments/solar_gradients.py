"""Gradient norm of each SOLAR stage-1 loss term, per parameter group, on one training batch.

  python -m experiments.solar_gradients                      # the defaults, at initialisation
  python -m experiments.solar_gradients --solar_args=tower_depth=0
  python -m experiments.solar_gradients --workdir=/tmp/solar/stage1 --step=150

Each term (masked ITC, GLA, LD, GD) is differentiated alone at weight 1 with respect to the
parameters (the trained ones of ``--workdir``'s stage 1, or a fresh initialisation), on the first
batch of the training stream; the step sets the annealing factor rho. Prints one Markdown table:
the L2 norm of each term's gradient over the towers, the adapters, the joint encoder and its
projection. The loss weights of the config multiply these norms in training.
"""

import jax
import jax.numpy as jnp
from absl import app, flags

from configs import solar as solar_config
from mmret import train
from mmret.data import pipeline

FLAGS = flags.FLAGS
flags.DEFINE_string("solar_args", "", "configs/solar.py arguments.")
flags.DEFINE_string("workdir", None, "A stage-1 run directory to load (default: initialisation).")
flags.DEFINE_integer("step", 0, "Training step the forward pass sees (sets rho).")
flags.DEFINE_integer("seed", 0, "Initialisation seed.")

TERMS = ("itc", "gla", "ld", "gd")
GROUPS = (
    "image_tower",
    "text_tower",
    "image_adapter",
    "text_adapter",
    "joint_encoder",
    "joint_proj",
)


def term_gradient_norms(setup, params, batch, *, step: int) -> dict:
  """{term: {parameter group: L2 norm of d(term)/d(params)}} for SOLAR's stage-1 loss terms
  (``setup``: the ``train.Setup`` of a stage-1 config)."""
  frozen = setup.method.init_frozen(setup.model, params, **setup.method_hparams)
  loss_fn, hparams = setup.loss_fn.func, dict(setup.loss_fn.keywords)
  out = {}
  for term in TERMS:
    weights = {f"{t}_weight": float(t == term) for t in TERMS}

    def loss(p):
      outputs = setup.forward(p, frozen, batch, rng=jax.random.PRNGKey(1), step=step)
      return loss_fn(outputs, batch, **dict(hparams, **weights))[0]

    grads = jax.jit(jax.grad(loss))(params)
    out[term] = {
        group: float(jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(grads[group]))))
        for group in GROUPS
        if group in grads
    }
  return out


def main(argv):
  del argv
  config = dict(train.stage_configs(solar_config.get_config(FLAGS.solar_args or None)))["stage1"]
  setup = train.Setup(config)
  if FLAGS.workdir:
    params = train.load_params(config, FLAGS.workdir)
  else:
    params = setup.initial_params(jax.random.PRNGKey(FLAGS.seed), FLAGS.seed)
  batch = jax.tree.map(jnp.asarray, next(pipeline.make_train_iterator(config.input, seed=0)))
  norms = term_gradient_norms(setup, params, batch, step=FLAGS.step)
  groups = [g for g in GROUPS if g in norms["itc"]]
  print("| term | " + " | ".join(groups) + " |")
  print("|---|" + "---|" * len(groups))
  for term in TERMS:
    print(f"| {term} | " + " | ".join(f"{norms[term][g]:.2e}" for g in groups) + " |")


if __name__ == "__main__":
  app.run(main)
