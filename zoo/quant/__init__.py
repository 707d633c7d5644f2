"""Weight-only int8 / int4 quantization: not built yet, see the quantization issue."""
