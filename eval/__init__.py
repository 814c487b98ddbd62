"""memsparse.eval: long-context retrieval tasks, harness and plots."""
