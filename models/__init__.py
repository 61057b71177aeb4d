"""Reference models: definitions, training recipes and small exported artefacts."""
