"""What an adapter folder holds, with no heavy imports (the HTTP client uses it too)."""

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
REQUIRED = (CONFIG, WEIGHTS)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")  # refused, never loaded
