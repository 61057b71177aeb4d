"""``moco optimize-memory`` / ``profile-memory``: shrink a model and show where its memory goes."""
