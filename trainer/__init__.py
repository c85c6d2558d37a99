"""The PyTorch DDP trainer that consumes prepared shards (lands with the trainer issue)."""
