"""Calibration and held-out batches for the stages that measure a model without training it (prune, quantize)."""

from __future__ import annotations

from typing import Any

from distillkit.errors import DataError, ModelError


def _image_size(processor: Any) -> int:
    size = getattr(processor, "size", None) or {}
    if isinstance(size, dict):
        return int(size.get("height") or size.get("shortest_edge") or 224)
    return int(size) if isinstance(size, int) else 224


def calibration_batches(cfg: Any, loaded: Any) -> tuple[list[dict], list[dict], dict[str, Any]]:
    """Calibration batches (from the train split) and held-out evaluation batches, materialised once.

    ``cfg`` is a stage config with the data fields (data, text_column, label_column, eval_split, max_length,
    max_samples, seed) and calib_batches, batch_size, eval_batches.
    """
    import torch

    from distillkit.data import DataSpec, prepare_data

    task = loaded.task
    if task == "image-classification" and cfg.data is None:
        # No image data given: random pixels still rank channels and measure agreement with the original.
        gen = torch.Generator().manual_seed(cfg.seed)
        s = _image_size(loaded.processor)
        channels = getattr(loaded.config, "num_channels", 3)

        def make(n: int) -> list[dict]:
            return [{"pixel_values": torch.randn(cfg.batch_size, channels, s, s, generator=gen)} for _ in range(n)]

        return make(cfg.calib_batches), make(cfg.eval_batches), {"source": "random pixels", "image_size": s}
    if loaded.processor is None:
        raise ModelError(
            f"{loaded.path} has no tokenizer or image processor saved with it",
            hint="save one with the model (tokenizer.save_pretrained(dir))",
        )
    if task != "image-classification":
        from distillkit.models.load import check_max_length

        check_max_length(loaded.config, cfg.max_length, who=loaded.path)
    data = prepare_data(
        DataSpec(
            data=cfg.data,
            text_column=cfg.text_column,
            label_column=cfg.label_column,
            eval_split=cfg.eval_split,
            max_length=cfg.max_length,
            max_samples=cfg.max_samples,
            seed=cfg.seed,
        ),
        loaded.processor,
        task,
    )
    if len(data.train) == 0:
        raise DataError("the calibration data is empty", hint="give more --data or a smaller --eval-split")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)  # masked-LM masking: the same batches every run
        order = torch.randperm(len(data.train)).tolist()
        b = cfg.batch_size
        calib = [
            data.collate_fn([data.train[i] for i in order[j : j + b]])
            for j in range(0, min(len(order), cfg.calib_batches * b), b)
        ]
        evals = [
            data.collate_fn([data.eval[i] for i in range(j, min(j + b, len(data.eval)))])
            for j in range(0, min(len(data.eval), cfg.eval_batches * b), b)
        ]
    return calib, evals, data.info


def held_out_quality(model: Any, batches: list[dict], loaded: Any, reference: Any, device: Any) -> dict[str, float]:
    from distillkit.evaluate import evaluate_quality

    if not batches:
        return {}
    return evaluate_quality(model, batches, loaded.task, teacher=reference, pooling=loaded.pooling, device=device)
