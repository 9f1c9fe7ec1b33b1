"""Packaging: the repository root is the `aft` package (the layout transformers' Hub code loader expects)."""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPy(build_py):
    """Ship the model modules, not this file."""

    def find_package_modules(self, package, package_dir):
        return [m for m in super().find_package_modules(package, package_dir) if m[1] != "setup"]


setup(
    name="aft-transformers",
    version="0.1.0",
    description="Attention Free Transformer (Zhai et al. 2021) models for Hugging Face transformers",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    packages=["aft"],
    package_dir={"aft": "."},
    cmdclass={"build_py": BuildPy},
    python_requires=">=3.10",
    # Lower bounds are the releases the test suite runs on (CI runs it on the floor and on the newest releases, the
    # rows of .ci/versions); no upper bounds, so that installing never downgrades a newer release.
    install_requires=[
        "torch>=2.13",
        "transformers>=5.18",
        "safetensors>=0.8",
        "huggingface_hub>=2.4",
        "tokenizers>=0.23",
        "pillow>=13",
    ],
    extras_require={
        # training scripts: accelerate + datasets; evaluate computes their metrics (with the modules shipped in
        # scripts/metrics, offline); scikit-learn ships the embedded image data (digits); matplotlib draws the loss
        # curves and benchmark plots
        "train": [
            "accelerate>=1.15",
            "datasets>=5.2",
            "evaluate>=0.4.6",
            "scikit-learn>=1.9",
            "matplotlib>=3.11",
        ],
        # the tools users put a model in, each tested on AFT in the suite (docs/works_with.md)
        "tools": [
            "peft>=0.21",
            "trl>=1.16",
            "lm-eval>=0.4.13",
            "onnx>=1.23",
            "onnxscript>=0.7",
            "onnxruntime>=1.32",
        ],
        # ruff is pinned to a minor release: a new one may format the same code differently (CI checks formatting);
        # pytest-xdist runs the suite on two processes (pytest.ini)
        "test": ["pytest>=9", "pytest-xdist>=3.8", "ruff>=0.17,<0.18"],
    },
)
