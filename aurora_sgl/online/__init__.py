"""Online training around the embedded engine: the flywheel (records out, swaps in, live rollback)
and the sidecar session that owns the segments and supervises the trainer."""
