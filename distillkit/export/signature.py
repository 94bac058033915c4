"""What a model takes and returns, as plain tensors: the shared ground of export and bench.

Exporters and benchmarks need the same three things: the names of the tensor inputs
(``input_ids``/``attention_mask``/``token_type_ids`` or ``pixel_values``), random sample inputs of
a given batch and sequence length, and a module whose ``forward`` takes those tensors
positionally and returns one tensor (``logits`` or ``last_hidden_state``), with the KV cache off.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

from distillkit.errors import DistillkitError, ModelError

TEXT_INPUT = "input_ids"
VISION_INPUT = "pixel_values"


@dataclass
class ModelIO:
    """The tensor interface of a model for one task.

    Text inputs are ``[B, T]`` int64; ``pixel_values`` is ``[B, C, H, W]`` float32. The output is
    ``logits`` (``[B, T, V]`` for LM heads, ``[B, num_labels]`` for classifiers) or
    ``last_hidden_state`` ``[B, T, D]`` for feature extraction.
    """

    kind: str  # "text" | "vision"
    task: str
    model_type: str
    input_names: list[str]
    output_name: str
    vocab_size: int = 0
    type_vocab_size: int = 0
    max_positions: int | None = None
    image_shape: tuple[int, int, int] = (3, 224, 224)
    token_level: bool = True  # output has a sequence axis that padding positions live on
    notes: list[str] = field(default_factory=list)

    @property
    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """ONNX-style names of the dynamic axes of every input."""
        if self.kind == "vision":
            return {n: {0: "batch"} for n in self.input_names}
        return {n: {0: "batch", 1: "sequence"} for n in self.input_names}

    def sample(self, batch: int, seq: int, *, seed: int = 0, pad: bool = False, device: Any = None) -> tuple[Any, ...]:
        """Random inputs in ``input_names`` order: token ids drawn uniformly from the vocabulary, or
        standard-normal pixels. ``pad`` right-pads the last row of a text batch (its attention mask ends in zeros)."""
        import torch

        g = torch.Generator().manual_seed(seed)
        out: list[Any] = []
        if self.kind == "vision":
            out.append(torch.randn((batch, *self.image_shape), generator=g))
        else:
            ids = torch.randint(0, self.vocab_size, (batch, seq), generator=g)
            mask = torch.ones_like(ids)
            if pad and seq > 2:
                mask[-1, seq - max(1, seq // 3) :] = 0
            for name in self.input_names:
                if name == "input_ids":
                    out.append(ids)
                elif name == "attention_mask":
                    out.append(mask)
                elif name == "token_type_ids":
                    out.append(torch.zeros_like(ids))
        return tuple(t.to(device) if device is not None else t for t in out)

    def valid_positions(self, inputs: tuple[Any, ...]) -> Any:
        """``[B, T]`` bool of the positions whose outputs are defined (not padding), or None."""
        if self.kind != "text" or not self.token_level or "attention_mask" not in self.input_names:
            return None
        return inputs[self.input_names.index("attention_mask")].bool()

    def wrap(self, model: Any) -> Any:
        """A module taking the inputs positionally and returning the one output tensor."""
        return _make_wrapper(model, self)


def _forward_params(model: Any) -> set[str]:
    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return set()


def image_shape_of(config: Any, processor: Any) -> tuple[int, int, int]:
    """``(channels, height, width)`` of a vision model's input: from its config, else its processor, else 224."""
    channels = int(getattr(config, "num_channels", 3) or 3)
    size = getattr(config, "image_size", None)
    if size is None and processor is not None:
        ps = getattr(processor, "crop_size", None) or getattr(processor, "size", None)
        if isinstance(ps, dict):
            size = (ps.get("height"), ps.get("width")) if ps.get("height") else ps.get("shortest_edge")
        elif hasattr(ps, "height") and getattr(ps, "height", None):
            size = (ps.height, ps.width)
    if isinstance(size, list | tuple) and len(size) == 2 and all(size):
        return channels, int(size[0]), int(size[1])
    if isinstance(size, int) and size > 0:
        return channels, size, size
    return channels, 224, 224


def describe_io(
    model: Any, task: str, processor: Any = None, *, purpose: str = "this", error: type[DistillkitError] = ModelError
) -> ModelIO:
    """The :class:`ModelIO` of a loaded transformers model, or ``error`` naming ``purpose`` when the
    model takes inputs distillkit cannot build (audio ``input_values``, encoder-decoder, ...)."""
    config = model.config
    model_type = str(getattr(config, "model_type", type(model).__name__))
    params = _forward_params(model)
    main = getattr(model, "main_input_name", TEXT_INPUT)
    if getattr(config, "is_encoder_decoder", False) or "decoder_input_ids" in params:
        raise error(
            f"{purpose} does not support encoder-decoder models ({model_type}, task {task})",
            hint="distillkit handles decoder-only and encoder-only text models and image classifiers",
        )
    output = "last_hidden_state" if task == "feature-extraction" else "logits"
    token_level = task in ("causal-lm", "masked-lm", "feature-extraction")
    if main == VISION_INPUT:
        return ModelIO(
            "vision",
            task,
            model_type,
            [VISION_INPUT],
            output,
            image_shape=image_shape_of(config, processor),
            token_level=False,
        )
    if main != TEXT_INPUT:
        raise error(
            f"{purpose} cannot build inputs for model type {model_type} (task {task}): it takes {main!r}",
            hint="distillkit handles text models (input_ids) and vision models (pixel_values)",
        )
    names = ["input_ids"]
    if "attention_mask" in params:
        names.append("attention_mask")
    type_vocab = int(getattr(config, "type_vocab_size", 0) or 0)
    # BERT-style models take segment ids; RoBERTa-style ones accept the argument but have a single segment.
    if "token_type_ids" in params and type_vocab > 1:
        names.append("token_type_ids")
    try:
        vocab = int(model.get_input_embeddings().num_embeddings)
    except (AttributeError, NotImplementedError, TypeError):
        text_cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
        vocab = int(getattr(text_cfg, "vocab_size", 0) or 0)
    if vocab <= 0:
        raise error(
            f"{purpose} cannot tell the vocabulary size of model type {model_type}",
            hint="the model needs an input embedding or config.vocab_size",
        )
    max_pos = None
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            max_pos = value
            break
    return ModelIO(
        "text",
        task,
        model_type,
        names,
        output,
        vocab_size=vocab,
        type_vocab_size=type_vocab,
        max_positions=max_pos,
        token_level=token_level,
    )


def _make_wrapper(model: Any, io: ModelIO) -> Any:
    import torch

    causal = io.task == "causal-lm"
    output = io.output_name

    def run(**inputs: Any) -> Any:
        if causal:
            inputs["use_cache"] = False  # logits only: no past_key_values in the exported graph
        out = model(**inputs, return_dict=True)
        return out[output] if isinstance(out, dict) else getattr(out, output)

    # Exporters read input names from the forward signature, so each input set gets its own class.
    if io.input_names == ["pixel_values"]:

        class VisionForward(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.model = model

            def forward(self, pixel_values):
                return run(pixel_values=pixel_values)

        return VisionForward().eval()
    if io.input_names == ["input_ids"]:

        class IdsForward(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.model = model

            def forward(self, input_ids):
                return run(input_ids=input_ids)

        return IdsForward().eval()
    if io.input_names == ["input_ids", "attention_mask"]:

        class TextForward(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.model = model

            def forward(self, input_ids, attention_mask):
                return run(input_ids=input_ids, attention_mask=attention_mask)

        return TextForward().eval()
    if io.input_names == ["input_ids", "attention_mask", "token_type_ids"]:

        class TextTypesForward(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.model = model

            def forward(self, input_ids, attention_mask, token_type_ids):
                return run(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)

        return TextTypesForward().eval()
    raise ModelError(f"no forward wrapper for inputs {io.input_names}")


def max_abs_diff(a: Any, b: Any, valid: Any = None) -> float:
    """``max |a - b|`` over the positions in ``valid`` (``[B, T]`` bool over the first two axes), as float64.

    Padding positions are left out: their outputs are undefined and differ between runtimes when a row
    of the attention mask is all zeros."""
    import numpy as np

    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        return float("inf")
    if valid is not None:
        valid = np.asarray(valid, dtype=bool)
        if a.ndim >= 2 and a.shape[:2] == valid.shape:
            a, b = a[valid], b[valid]
    if a.size == 0:
        return 0.0
    diff = np.abs(a - b)
    if not np.all(np.isfinite(diff)):
        return float("inf")
    return float(diff.max())
