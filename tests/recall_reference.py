"""Test helper: image<->text recall of the 5-caption protocol, computed in numpy from embeddings
(scores by dot product, ranks by sorting), to check reported metrics against."""

import numpy as np

from mmret.data import sources
from mmret.evals import embed


def caption5_recall(image_z, text_z, caption_image, ks=(1, 5, 10)):
  """{'i2t/recall@k', 't2i/recall@k', 'rsum'} in percent. An image is found when any of its
  captions ranks within k; a caption when its image does."""
  scores = np.asarray(image_z, np.float64) @ np.asarray(text_z, np.float64).T
  out = {}
  i2t_rank = []
  for image, row in enumerate(scores):
    order = np.argsort(-row, kind="stable")
    i2t_rank.append(min(np.flatnonzero(caption_image[order] == image)))
  t2i_rank = []
  for caption, column in enumerate(scores.T):
    order = np.argsort(-column, kind="stable")
    t2i_rank.append(int(np.flatnonzero(order == caption_image[caption])[0]))
  for direction, ranks in (("i2t", np.array(i2t_rank)), ("t2i", np.array(t2i_rank))):
    for k in ks:
      out[f"{direction}/recall@{k}"] = 100.0 * np.mean(ranks < k)
  out["rsum"] = sum(out[f"{d}/recall@{k}"] for d in ("i2t", "t2i") for k in ks)
  return out


def trained_caption5_recall(predict_fn, params, input_cfg, dataset, split, data_dir):
  """caption5_recall of a model on a caption5 split: its embeddings, then the numpy protocol."""
  records = sources.open_split(dataset, split, data_dir)
  images = [{"id": str(i), "image": records[i]["image"]} for i in range(len(records))]
  captions, caption_image = [], []
  for i in range(len(records)):
    for text in records[i]["captions"]:
      captions.append({"id": f"{i}/{len(captions)}", "text": text})
      caption_image.append(i)
  kwargs = dict(input_cfg=input_cfg, batch_size=64, params=params)
  image_z = embed.embed_items(predict_fn, images, "image", **kwargs)
  text_z = embed.embed_items(predict_fn, captions, "text", **kwargs)
  return caption5_recall(image_z, text_z, np.asarray(caption_image))
