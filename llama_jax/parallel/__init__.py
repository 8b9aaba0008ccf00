"""Where arrays live: logical axis names, the rules tables mapping them to the ("data", "fsdp", "tensor")
mesh, mesh construction, batch placement, and joining a multi-host job. Knows nothing of the model."""
