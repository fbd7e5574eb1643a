"""Runtime of serving processes: devices, and the runner and collective groups beside them."""
