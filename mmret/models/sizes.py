"""Named model sizes. A size fills every architecture field a config leaves as None.

Sizes named after a published checkpoint reproduce its architecture exactly, so the checkpoint
loads into them (``model.init``, see mmret/models/pretrained.py). Their ``model_defaults`` are the
top-level ``config.model`` fields the checkpoint needs (e.g. CLIP's causal text tower);
``mmret.config_lib.model_config(size)`` applies them.
"""

SIZES = {
    # CI-sized: compiles and trains in seconds on a CPU.
    "tiny": dict(
        image=dict(width=64, depth=2, heads=2, mlp_dim=256, patch_size=8),
        text=dict(width=64, depth=2, heads=2, mlp_dim=256),
        joint=dict(depth=2, heads=2, mlp_dim=256),
        embed_dim=64,
    ),
    # ViT-S/16-scale towers.
    "small": dict(
        image=dict(width=384, depth=12, heads=6, mlp_dim=1536, patch_size=16),
        text=dict(width=384, depth=6, heads=6, mlp_dim=1536),
        joint=dict(depth=3, heads=6, mlp_dim=1536),
        embed_dim=384,
    ),
    # CLIP ViT-B/16 towers.
    "base": dict(
        image=dict(width=768, depth=12, heads=12, mlp_dim=3072, patch_size=16),
        text=dict(width=512, depth=12, heads=8, mlp_dim=2048),
        joint=dict(depth=3, heads=8, mlp_dim=2048),
        embed_dim=512,
    ),
}

_JOINT_512 = dict(depth=3, heads=8, mlp_dim=2048)
_JOINT_384 = dict(depth=3, heads=6, mlp_dim=1536)
_CLIP_IMAGE = dict(ln_pre=True, activation="quick_gelu", ln_eps=1e-5)
_CLIP_TEXT = dict(activation="quick_gelu", ln_eps=1e-5)
_CLIP_DEFAULTS = dict(image_pool="cls", text_pool="eos", text_causal=True)
_BERT_TEXT = dict(kind="bert", width=384, heads=12, mlp_dim=1536, activation="gelu", ln_eps=1e-12)

SIZES.update(
    {
        # OpenAI CLIP ViT-B/32 and ViT-B/16 (also open_clip and Hugging Face releases of them).
        "clip_vit_b32": dict(
            image=dict(width=768, depth=12, heads=12, mlp_dim=3072, patch_size=32, **_CLIP_IMAGE),
            text=dict(width=512, depth=12, heads=8, mlp_dim=2048, **_CLIP_TEXT),
            joint=_JOINT_512,
            embed_dim=512,
            model_defaults=_CLIP_DEFAULTS,
        ),
        "clip_vit_b16": dict(
            image=dict(width=768, depth=12, heads=12, mlp_dim=3072, patch_size=16, **_CLIP_IMAGE),
            text=dict(width=512, depth=12, heads=8, mlp_dim=2048, **_CLIP_TEXT),
            joint=_JOINT_512,
            embed_dim=512,
            model_defaults=_CLIP_DEFAULTS,
        ),
        # TinyCLIP (open_clip and Hugging Face releases). Widths/depths as published; the activation
        # is OpenAI CLIP's, whose weights TinyCLIP inherits: if a release's config.json says
        # hidden_act='gelu', set model.image.activation / model.text.activation to 'gelu'.
        "tinyclip_vit_40m_32_text_19m": dict(
            image=dict(width=512, depth=12, heads=8, mlp_dim=2048, patch_size=32, **_CLIP_IMAGE),
            text=dict(width=512, depth=6, heads=8, mlp_dim=2048, **_CLIP_TEXT),
            joint=_JOINT_512,
            embed_dim=512,
            model_defaults=_CLIP_DEFAULTS,
        ),
        "tinyclip_vit_39m_16_text_19m": dict(
            image=dict(width=512, depth=12, heads=8, mlp_dim=2048, patch_size=16, **_CLIP_IMAGE),
            text=dict(width=512, depth=6, heads=8, mlp_dim=2048, **_CLIP_TEXT),
            joint=_JOINT_512,
            embed_dim=512,
            model_defaults=_CLIP_DEFAULTS,
        ),
        "tinyclip_vit_8m_16_text_3m": dict(
            image=dict(width=256, depth=10, heads=4, mlp_dim=1024, patch_size=16, **_CLIP_IMAGE),
            text=dict(width=256, depth=3, heads=4, mlp_dim=1024, **_CLIP_TEXT),
            joint=dict(depth=2, heads=4, mlp_dim=1024),
            embed_dim=512,
            model_defaults=_CLIP_DEFAULTS,
        ),
        # EfficientNet-Lite0 (ImageNet) + all-MiniLM-L6-v2 (mean-pooled sentence encoder); the
        # square 384 projection starts as the identity, so z_text is MiniLM's sentence embedding.
        "minilm_l6_efficientnet_lite0": dict(
            image=dict(kind="efficientnet_lite0"),
            text=dict(depth=6, **_BERT_TEXT),
            joint=_JOINT_384,
            embed_dim=384,
            model_defaults=dict(image_pool="gap", text_pool="mean", text_causal=False),
        ),
        # DINOv2 ViT-S/14 + BGE-small (CLS-pooled BERT, 12 layers).
        "dinov2_vit_s14_bge_small": dict(
            image=dict(
                width=384,
                depth=12,
                heads=6,
                mlp_dim=1536,
                patch_size=14,
                layer_scale=True,
                ln_eps=1e-6,
            ),
            text=dict(depth=12, **_BERT_TEXT),
            joint=_JOINT_384,
            embed_dim=384,
            model_defaults=dict(image_pool="cls", text_pool="cls", text_causal=False),
        ),
    }
)


def model_defaults(size: str) -> dict:
  """Top-level ``config.model`` fields that the named size needs (empty for mmret's own sizes)."""
  if size not in SIZES:
    raise ValueError(f"unknown model.size {size!r}; known sizes: {sorted(SIZES)}")
  return dict(SIZES[size].get("model_defaults", {}))


def resolve(model_cfg) -> dict:
  """Architecture dict from ``model_cfg``: the named size, overridden by fields that are set."""
  size = model_cfg.size
  if size not in SIZES:
    raise ValueError(f"unknown model.size {size!r}; known sizes: {sorted(SIZES)}")
  arch = {
      k: dict(v) if isinstance(v, dict) else v
      for k, v in SIZES[size].items()
      if k != "model_defaults"
  }
  for group in ("image", "text", "joint"):
    for key, value in model_cfg[group].items():
      if value is not None:
        arch[group][key] = value
  if model_cfg.embed_dim is not None:
    arch["embed_dim"] = model_cfg.embed_dim
  return arch
