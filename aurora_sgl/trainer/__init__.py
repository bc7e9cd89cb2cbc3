"""The trainer sidecar (`python -m aurora_sgl.trainer --spec PATH`): reads the signal ring, trains
the head, and publishes guarded versions into the weight store."""
