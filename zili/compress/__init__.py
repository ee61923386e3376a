"""Weight compression: RTN / GPTQ / AWQ quantization (model -> model) and quantized checkpoint formats."""
