"""The bottom layer: small helpers every other package may use (configs from YAML, tree paths, dtype
names, atomic file writes, host-allocator tuning). Imports nothing from the rest of llama_jax."""
