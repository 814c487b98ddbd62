"""memsparse: adaptive sparse window attention + Titans-style neural long-term memory."""

__version__ = "0.1.0"
