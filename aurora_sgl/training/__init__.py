"""The math of training a draft head: losses (the TTT unroll and the objectives), batches and one
optimizer step, and offline training from generated traffic."""
