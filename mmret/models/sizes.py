"""Named model sizes. A size fills every architecture field a config leaves as None."""

SIZES = {
    # CI-sized: compiles and trains in seconds on a CPU.
    "tiny": dict(
        image=dict(width=64, depth=2, heads=2, mlp_dim=256, patch_size=8),
        text=dict(width=64, depth=2, heads=2, mlp_dim=256),
        joint=dict(depth=2, heads=2, mlp_dim=256),
        embed_dim=64),
    # ViT-S/16-scale towers.
    "small": dict(
        image=dict(width=384, depth=12, heads=6, mlp_dim=1536, patch_size=16),
        text=dict(width=384, depth=6, heads=6, mlp_dim=1536),
        joint=dict(depth=3, heads=6, mlp_dim=1536),
        embed_dim=384),
    # CLIP ViT-B/16 towers.
    "base": dict(
        image=dict(width=768, depth=12, heads=12, mlp_dim=3072, patch_size=16),
        text=dict(width=512, depth=12, heads=8, mlp_dim=2048),
        joint=dict(depth=3, heads=8, mlp_dim=2048),
        embed_dim=512),
}


def resolve(model_cfg) -> dict:
  """Architecture dict from ``model_cfg``: the named size, overridden by fields that are set."""
  size = model_cfg.size
  if size not in SIZES:
    raise ValueError(f"unknown model.size {size!r}; known sizes: {sorted(SIZES)}")
  arch = {k: dict(v) if isinstance(v, dict) else v for k, v in SIZES[size].items()}
  for group in ("image", "text", "joint"):
    for key, value in model_cfg[group].items():
      if value is not None:
        arch[group][key] = value
  if model_cfg.embed_dim is not None:
    arch["embed_dim"] = model_cfg.embed_dim
  return arch
