"""Test setup: 8 fake CPU devices (set before jax is imported) and parsed absl flags."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from absl import flags  # noqa: E402

# Grain worker processes and absl-using code expect parsed flags.
flags.FLAGS.mark_as_parsed()
