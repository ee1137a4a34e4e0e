"""Megatron model providers (Qwen2/2.5 text, Qwen2.5-VL), their declarative HF <-> Megatron mappings, the model
family table (`families.py`), HF weight loading/export, tiny random checkpoints and the HF parity forward.

Nothing is imported here: `import spark_megatron.models.qwen2` pulls in only what it needs."""
