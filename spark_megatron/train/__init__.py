"""The trainer's model side: the actor (DDP + distributed optimizer, micro-batched pipeline schedules), the
frozen reference, vocab-parallel logprobs, sequence batching and VL inputs.

Nothing is imported here (the actor pulls in megatron-core): import the module you need."""
