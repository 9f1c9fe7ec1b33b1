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
    # The ranges we have tested (CPU, Python 3.11); widen them only after running the tests on the new versions.
    install_requires=[
        "torch>=2.13,<2.14",
        "transformers>=5.23,<5.24",
        "safetensors>=0.8,<0.9",
        "huggingface_hub>=2.4,<2.5",
        "tokenizers>=0.23,<0.24",
        "pillow>=13,<14",
    ],
    extras_require={
        # training scripts: accelerate + datasets; evaluate computes their metrics (with the modules shipped in
        # scripts/metrics, offline); scikit-learn ships the embedded image data (digits); matplotlib draws the loss
        # curves and benchmark plots
        "train": [
            "accelerate>=1.15,<1.16",
            "datasets>=5.2,<5.3",
            "evaluate>=0.4.6,<0.5",
            "scikit-learn>=1.9,<1.10",
            "matplotlib>=3.11,<3.12",
        ],
        "test": ["pytest>=9,<10", "ruff>=0.17,<0.18"],
    },
)
