"""Graph analyses and rewrites: read-only index, cut points, FLOPs, the exit rewrite and its verification."""
