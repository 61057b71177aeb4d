"""Names every part of moco shares: the compiled graph's extra output."""
from __future__ import annotations

EXIT_OUTPUT = "moco_exit"  # int64 per row: the index of the exit the row took, -1 = full network
