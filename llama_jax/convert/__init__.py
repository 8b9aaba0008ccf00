"""Checkpoint conversion between llama_jax (orbax), Meta's release format and Hugging Face's, all directions.

`python -m llama_jax.convert --from meta|hf|orbax --to meta|hf|orbax SRC DST` (see `__main__`);
`read_checkpoint(path)` loads any of the three into memory for evaluation.
One module per format (`meta`, `hf`, `ours`), the conversion loop in `pipeline`; the tensor name and
layout mapping itself is `llama_jax.model.params`.
"""
from llama_jax.convert.common import ConvertError
from llama_jax.convert.pipeline import convert, detect_format, open_reader, read_checkpoint

__all__ = ["ConvertError", "convert", "detect_format", "open_reader", "read_checkpoint"]
