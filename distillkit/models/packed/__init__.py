"""distillkit's packed low-bit artifacts, as the loader reads them: the codes' layout (``codes``), the quantized
modules (``modules``), the CPU products they can use (``kernels``) and the files (``format``).

It sits with the other shared model parts because ``load_model`` and ``export`` read packed artifacts; the quantize
stage (GPTQ, QAT, schemes) writes them. Importing this package does not import torch.
"""

QUANT_KERNELS = ("auto", "cpu-bf16", "cached", "dequant")  # how packed layers multiply once loaded (see kernels.py)
