"""Scale-out: sharded calibration data and the Ray engine (``--engine ray``)."""
