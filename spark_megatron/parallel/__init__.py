"""Process groups, the CPU/gloo compatibility layer, and vocab-parallel helpers."""
