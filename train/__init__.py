"""memsparse.train: Lightning training (module, data, tokenizer building, CLI)."""
