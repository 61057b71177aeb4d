"""Serving mixture-of-experts decoders with offloaded experts: decoding, expert cache, timeline."""
