"""Multi-LoRA: adapter loading and validation, device slot stacks, the LRU caches."""
