"""Calibration and rules: record cut activations, pool them, fit rules, guards and exit confidence."""
