"""spark_megatron: a Megatron-Core training backend for SPARK (policy and generative reward model in one)."""
__version__ = "0.1.0"
