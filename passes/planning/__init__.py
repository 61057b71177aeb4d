"""Planning and certification: from scored calibration rows to a certified exit plan."""
