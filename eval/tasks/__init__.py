"""Registry of synthetic long-context tasks."""
