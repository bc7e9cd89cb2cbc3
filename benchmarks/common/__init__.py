"""What the benchmarks and the tests share: where the datasets are, and the real server as a subprocess."""
