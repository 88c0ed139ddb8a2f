"""The GCL recipe: config choices, the modality-gap evaluator, and a short end-to-end table run."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from configs import gcl
from experiments import gcl_table
from mmret import registry, train
from mmret.data import world
from mmret.data import sources
from mmret.evals import embed, modality_gap

# ---------------------------------------------------------------------------------------------
# Config.


@pytest.mark.parametrize("loss", gcl.LOSSES)
@pytest.mark.parametrize("fusion", gcl.FUSIONS)
def test_config_builds_two_stages_for_every_loss_and_fusion(loss, fusion):
  config = gcl.get_config(f"loss={loss},fusion={fusion},steps=7,pretrain_steps=9")
  stages = train.stage_configs(config)
  assert [name for name, _ in stages] == [gcl.PRETRAIN, gcl.FINETUNE]
  (_, pretrain), (_, finetune) = stages
  assert pretrain.loss.name == "clip" and pretrain.total_steps == 9
  assert finetune.loss.name == loss and finetune.total_steps == 7
  assert finetune.optim.lr < pretrain.optim.lr
  assert pretrain.model.joint_kind == finetune.model.joint_kind == fusion
  assert {c.type for c in config.evals.values()} == {"retrieval", "modality_gap"}

  # The fine-tuning stage trains with the named loss and its hyper-parameters.
  loss_fn = train.loss_function(finetune)
  assert loss_fn.func is registry.loss(loss)
  assert loss_fn.keywords == {k: v for k, v in finetune.loss.items() if k != "name"}
  assert train.loss_function(pretrain).func is registry.loss("clip")


def test_config_options_reach_the_finetuning_loss():
  config = gcl.get_config("loss=gcl,drop_other_positive=true,temperature=0.05")
  finetune = dict(train.stage_configs(config))[gcl.FINETUNE]
  assert finetune.loss.to_dict() == {
      "name": "gcl",
      "drop_other_positive": True,
      "temperature": 0.05,
      "impl": "dense",
      "block_size": 512,
  }
  assert not gcl.get_config("evals=false").evals


@pytest.mark.parametrize(
    "arg, culprit",
    [
        ("loss=triplet", "triplet"),
        ("fusion=concat", "concat"),
        ("loss=cl,drop_other_positive=true", "drop_other"),
        ("steps=0", "steps"),
    ],
)
def test_config_rejects_bad_arguments(arg, culprit):
  with pytest.raises(ValueError, match=culprit):
    gcl.get_config(arg)


# ---------------------------------------------------------------------------------------------
# Modality gap.


def test_centroid_gap_on_known_embeddings():
  s = 1 / np.sqrt(2)
  gap = modality_gap.centroid_gap(
      {
          "i": np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]),  # centroid (0.5, 0, 0.5)
          "t": np.array([[0.0, 1.0, 0.0]] * 3),  # centroid (0, 1, 0)
          "it": np.array([[s, s, 0.0], [s, s, 0.0]]),  # centroid (s, s, 0)
      }
  )
  assert list(gap) == [
      "cosine/i-t",
      "distance/i-t",
      "cosine/i-it",
      "distance/i-it",
      "cosine/t-it",
      "distance/t-it",
  ]
  np.testing.assert_allclose(gap["cosine/i-t"], 0.0, atol=1e-12)
  np.testing.assert_allclose(gap["distance/i-t"], np.sqrt(0.25 + 1 + 0.25))
  np.testing.assert_allclose(gap["cosine/i-it"], 0.5 * s / (s * 1.0))  # (0.5 s) / (|c_i| |c_it|)
  np.testing.assert_allclose(gap["cosine/t-it"], s)
  np.testing.assert_allclose(gap["distance/t-it"], np.sqrt(s**2 + (1 - s) ** 2))


def test_centroid_gap_rejects_bad_input():
  with pytest.raises(ValueError, match="'t'"):
    modality_gap.centroid_gap({"i": np.ones((2, 3)), "t": np.zeros((0, 3))})
  with pytest.raises(ValueError, match="widths"):
    modality_gap.centroid_gap({"i": np.ones((2, 3)), "t": np.ones((2, 4))})
  with pytest.raises(ValueError, match="zero"):
    modality_gap.centroid_gap({"i": np.array([[1.0], [-1.0]]), "t": np.ones((2, 1))})


# Records whose image / text decode to known vectors: image bytes b"k" -> e_k, text "w<k>" -> e_k.
WIDTH = 4


def _fake_batches(items, *, input_cfg, batch_size, process_index, process_count):
  del input_cfg, process_index, process_count
  for start in range(0, len(items), batch_size):
    rows = list(range(start, min(start + batch_size, len(items))))
    batch = {"valid": np.ones(len(rows), bool), "index": np.asarray(rows, np.int32)}
    if "image" in items[0]:
      batch["image"] = np.eye(WIDTH, dtype=np.float32)[[int(items[r]["image"]) for r in rows]]
    if "text" in items[0]:
      batch["text_ids"] = np.asarray([int(items[r]["text"][1:]) for r in rows], np.int32)
    yield batch


def _fake_predict(params, batch):
  del params
  out = {}
  if "image" in batch:
    out["z_image"] = batch["image"]
  if "text_ids" in batch:
    out["z_text"] = jnp.eye(WIDTH)[batch["text_ids"]]
  if "image" in batch and "text_ids" in batch:
    joint = out["z_image"] + out["z_text"]
    out["z_joint"] = joint / jnp.linalg.norm(joint, axis=-1, keepdims=True)
  return out


def test_modality_gap_evaluator_on_known_embeddings():
  records = [
      {"id": "a", "image": b"0", "caption": "w1"},
      {"id": "b", "image": b"0", "caption": "w1"},
      {"id": "c", "image": b"", "caption": "w2"},  # text only: counts for t, not for i or it
      {"id": "d", "image": b"3", "caption": ""},  # image only
      {"id": "e", "image": b"2", "caption": "w2"},  # beyond max_records
  ]
  metrics = modality_gap.MODALITY_GAP.evaluate(
      _fake_predict,
      data=records,
      input_cfg=None,
      batch_size=2,
      max_records=4,
      batches_fn=_fake_batches,
  )
  assert metrics["count/i"] == 3 and metrics["count/t"] == 3 and metrics["count/it"] == 2
  centroid_i = np.array([2, 0, 0, 1]) / 3
  centroid_t = np.array([0, 2, 1, 0]) / 3
  centroid_it = np.array([1, 1, 0, 0]) / np.sqrt(2)
  cosine = lambda a, b: a @ b / np.linalg.norm(a) / np.linalg.norm(b)  # noqa: E731
  np.testing.assert_allclose(metrics["cosine/i-t"], 0.0, atol=1e-6)
  np.testing.assert_allclose(metrics["cosine/i-it"], cosine(centroid_i, centroid_it), rtol=1e-6)
  np.testing.assert_allclose(metrics["cosine/t-it"], cosine(centroid_t, centroid_it), rtol=1e-6)
  np.testing.assert_allclose(
      metrics["distance/i-t"], np.linalg.norm(centroid_i - centroid_t), rtol=1e-6
  )


def test_modality_gap_evaluator_names_missing_inputs():
  run = lambda records, **kw: modality_gap.MODALITY_GAP.evaluate(  # noqa: E731
      _fake_predict, data=records, input_cfg=None, batches_fn=_fake_batches, **kw
  )
  with pytest.raises(KeyError, match="label"):
    run([{"id": "a", "image": b"0", "caption": "w1"}], text_field="label")
  with pytest.raises(ValueError, match="'image,text'"):
    run([{"id": "a", "image": b"0", "text": ""}, {"id": "b", "image": b"", "text": "w1"}])


# ---------------------------------------------------------------------------------------------
# End to end: the table's init and GCL runs (the recipe's two stages) on the tiny world.

# A one-layer model and small batches keep the two compiled train steps cheap.
SMALL_RUN = {
    "mapping": "shard_map",
    "input.batch_size": 16,
    "model.image.depth": 1,
    "model.text.depth": 1,
    "model.joint.depth": 1,
    "model.embed_dim": 32,
    "evals.gap_train.max_records": 32,
}


@pytest.mark.slow
def test_table_run_shares_pretraining_and_reports_every_task(tmp_path, world_data_dir):
  workdir = str(tmp_path / "table")
  markdown = gcl_table.run_table(
      workdir,
      [0],
      variants=("init", "gcl"),
      data_dir=world_data_dir,
      size="tiny",
      world_name="tiny",
      steps=2,
      pretrain_steps=2,
      fusion="fusion",
      lr=1e-4,
      temperature=0.0,
      drop_other_positive=False,
      overrides=SMALL_RUN,
  )

  # GCL fine-tuned init's checkpoint instead of pretraining again.
  link = os.path.join(workdir, "gcl", "seed0", gcl.PRETRAIN)
  assert os.path.islink(link)
  assert os.path.samefile(link, os.path.join(workdir, "init", "seed0", gcl.PRETRAIN))
  record = json.load(open(os.path.join(workdir, "gcl_table.json")))
  init, tuned = record["runs"]["init"][0], record["runs"]["gcl"][0]
  assert "acc_i2t" in init and "acc_same_sample" in tuned  # the CLIP, then the GCL loss

  for metrics in (init, tuned):
    local = [metrics[f"eval/universal/local/{task}/recall@5"] for task in world.UNIVERSAL_TASKS]
    global_ = [metrics[f"eval/universal/global/{task}/recall@5"] for task in world.UNIVERSAL_TASKS]
    assert metrics["eval/universal/local/average"] == pytest.approx(np.mean(local))
    # The global pool holds every local pool: a positive can only rank lower there.
    assert all(g <= l for g, l in zip(global_, local))

  # The modality gap the table reports is the fine-tuned model's, recomputed here from its
  # embeddings of the first 32 training pairs.
  config = gcl_table.make_variant_config(
      "gcl",
      0,
      world_data_dir,
      SMALL_RUN,
      size="tiny",
      world_name="tiny",
      steps=2,
      pretrain_steps=2,
      fusion="fusion",
      lr=1e-4,
      temperature=0.0,
      drop_other_positive=False,
  )
  stage, stage_dir = train.last_stage(config, os.path.join(workdir, "gcl", "seed0"))
  params = train.load_params(stage, stage_dir)
  records = sources.open_split("mmret_world/tiny", "train", stage.input.data_dir)
  items = [
      {"id": str(i), "image": records[i]["image"], "text": records[i]["caption"]} for i in range(32)
  ]
  centroid = {}
  for short, modality in modality_gap.MODALITIES.items():
    parts = set(modality.split(","))
    z = embed.embed_items(
        train.Setup(stage).predict,
        [{k: v for k, v in item.items() if k == "id" or k in parts} for item in items],
        modality,
        input_cfg=stage.input,
        batch_size=64,
        params=params,
    )
    centroid[short] = np.asarray(z, np.float64).mean(0)
  for a, b in (("i", "t"), ("i", "it"), ("t", "it")):
    cosine = centroid[a] @ centroid[b] / np.linalg.norm(centroid[a]) / np.linalg.norm(centroid[b])
    assert tuned[f"eval/gap_train/cosine/{a}-{b}"] == pytest.approx(cosine, abs=1e-5)
    distance = np.linalg.norm(centroid[a] - centroid[b])
    assert tuned[f"eval/gap_train/distance/{a}-{b}"] == pytest.approx(distance, abs=1e-5)

  assert "| init |" in markdown and "| gcl |" in markdown and "qit_cit" in markdown
  assert open(os.path.join(workdir, "gcl_table.md")).read() == markdown
  mean = record["summary"]["gcl"]["eval/universal/local/average"]
  assert mean == {"mean": tuned["eval/universal/local/average"], "std": 0.0}
  assert tuned["eval/gap_train/count/it"] == 32  # the overrides reached the runs


def test_table_links_refuse_to_replace_a_directory(tmp_path):
  os.makedirs(tmp_path / "cl" / "seed0" / gcl.PRETRAIN)
  with pytest.raises(FileExistsError, match="not a link"):
    gcl_table.link_pretrain_stages(str(tmp_path), ("init", "cl"), [0])
  with pytest.raises(ValueError, match="start with 'init'"):
    gcl_table.run_table(str(tmp_path), [0], variants=("gcl",))


def test_table_workdir_refuses_other_arguments(tmp_path):
  gcl_table.check_workdir_args(str(tmp_path), {"steps": 5, "lr": 1e-4})
  gcl_table.check_workdir_args(str(tmp_path), {"steps": 5, "lr": 1e-4})  # same: reused
  with pytest.raises(ValueError, match=r"changed: \['steps'\]"):
    gcl_table.check_workdir_args(str(tmp_path), {"steps": 6, "lr": 1e-4})
