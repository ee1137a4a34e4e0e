"""Process groups, the CPU/gloo compatibility layer for megatron-core, micro-batched runs through megatron's
pipeline schedules, the rank spawner and rank status files."""
