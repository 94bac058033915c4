"""Post-training quantization and quantized distillation."""
