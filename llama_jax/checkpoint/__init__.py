"""Our checkpoints on disk: the one package that writes and reads them, and the only one importing orbax.

`layout` says where everything is (params directories, run directories); `params` reads the params of
either, whole or straight into shards, and writes params directories; `run` saves and restores a
training run's steps, its strict reader of a step's JSON meta included; `integrity` records each saved
file's size and CRC-32 and checks them; `orbax_io` is every call into orbax and TensorStore.
"""
