"""Entry points: the CLI (and, later, Ray jobs and the context-extension curriculum)."""
