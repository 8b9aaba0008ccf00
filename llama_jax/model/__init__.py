"""The LLaMA model: its config and presets, the decoder, attention implementations, the checkpoint
name table, and `api` (build, apply, init, shapes, logical axes) that every other package goes through."""
