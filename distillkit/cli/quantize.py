"""``distillkit quantize``: flags -> QuantizeConfig -> quantize engine -> manifest on stdout."""

from __future__ import annotations

from typing import Annotated

import typer

from distillkit.cli import options as o


def _scheme_help() -> str:
    from distillkit.registry import SCHEMES

    return f"Quantization scheme (default int4). {SCHEMES.help_text()}."


def quantize(
    model: Annotated[
        str,
        typer.Argument(
            metavar="MODEL",
            help="The model: '-' (previous stage on stdin), an artifact directory, a distillkit.json, a model directory or a hub id.",
        ),
    ],
    scheme: Annotated[str | None, typer.Option("--scheme", help=_scheme_help())] = None,
    group_size: Annotated[
        int | None,
        typer.Option(
            "--group-size",
            "-g",
            help="Input features per scale: 32, 64, 128, or 0 for per-channel (default: scheme's).",
        ),
    ] = None,
    symmetric: Annotated[
        bool | None,
        typer.Option(
            "--symmetric/--asymmetric",
            help="Symmetric grid (implicit zero-point) or asymmetric (uint8 zero-points). Default: the scheme's.",
        ),
    ] = None,
    method: Annotated[
        str | None,
        typer.Option(
            "--method",
            help="Post-training method: gptq (error compensation from calibration data; default) or rtn (round-to-nearest).",
        ),
    ] = None,
    skip: Annotated[
        list[str] | None,
        typer.Option(
            "--skip", help="Keep modules matching this name or glob in full precision (repeatable), e.g. lm_head."
        ),
    ] = None,
    embeddings: Annotated[
        bool | None,
        typer.Option("--embeddings/--no-embeddings", help="Quantize embedding tables too (default yes)."),
    ] = None,
    embedding_bits: Annotated[
        int | None,
        typer.Option(
            "--embedding-bits",
            help="Bits of the embedding tables (8, 4, 3, 2; default 8 for int4/int3/int2, also in quantized distillation; else the scheme's).",
        ),
    ] = None,
    damp: Annotated[
        float | None,
        typer.Option("--damp", help="GPTQ Hessian dampening, relative to its mean diagonal (default 0.1)."),
    ] = None,
    act_order: Annotated[
        bool | None,
        typer.Option(
            "--act-order/--no-act-order",
            help="GPTQ: quantize columns by decreasing input energy, with static groups (default yes).",
        ),
    ] = None,
    clip_search: Annotated[
        bool | None,
        typer.Option(
            "--clip-search/--no-clip-search",
            help="Shrink each group's range where that lowers its Hessian-weighted error (default yes).",
        ),
    ] = None,
    reconstruct_steps: Annotated[
        int | None,
        typer.Option(
            "--reconstruct-steps",
            help="Block-wise reconstruction after GPTQ: train each block's latent weights and step sizes for N steps to reproduce the float block's outputs (default: 400 for int3 and int2, else 0; 0 turns it off).",
        ),
    ] = None,
    reconstruct_lr: Annotated[
        float | None,
        typer.Option("--reconstruct-lr", help="Learning rate of block-wise reconstruction (default 3e-4)."),
    ] = None,
    sensitive_fraction: Annotated[
        float | None,
        typer.Option(
            "--sensitive-fraction",
            help="Mixed precision: measure each Linear's output error when quantized alone and store the most sensitive, up to this fraction of the weights, at --sensitive-bits (default 0: off).",
        ),
    ] = None,
    sensitive_bits: Annotated[
        int | None,
        typer.Option(
            "--sensitive-bits",
            help="Bits of the layers --sensitive-fraction promotes (3, 4 or 8; default: the next wider than the scheme's).",
        ),
    ] = None,
    teacher: Annotated[
        str | None,
        typer.Option(
            "--teacher",
            "-t",
            help="Full-precision teacher for quantized distillation (--qat-steps) and the quality reference.",
        ),
    ] = None,
    qat_steps: Annotated[
        int | None,
        typer.Option(
            "--qat-steps",
            help="Quantized distillation: train the fake-quantized model against --teacher for N steps (default 0).",
        ),
    ] = None,
    qat_lr: Annotated[float | None, typer.Option("--qat-lr", help="Learning rate of QAT (default 1e-4).")] = None,
    quantizer: Annotated[
        str | None,
        typer.Option(
            "--quantizer",
            help="QAT fake-quant: lsq (learned step sizes; default), ste (round-to-nearest grid, straight-through), dq (learned quantization points, Polino et al.).",
        ),
    ] = None,
    act_bits: Annotated[
        int | None,
        typer.Option(
            "--act-bits", help="Also fake-quantize Linear inputs to 8 (or 4) bits per token during and after QAT."
        ),
    ] = None,
    loss: Annotated[
        list[str] | None, typer.Option("--loss", "-l", help="QAT loss NAME[:WEIGHT] as in distill (default per task).")
    ] = None,
    temperature: Annotated[
        float | None, typer.Option("--temperature", "-T", help="QAT logit temperature (default 2.0).")
    ] = None,
    task: o.Task = None,
    data: Annotated[
        str | None,
        typer.Option(
            "--data", "-d", help="Calibration, QAT and evaluation data, as for distill (default: builtin:english)."
        ),
    ] = None,
    text_column: o.TextColumn = None,
    label_column: o.LabelColumn = None,
    eval_split: o.QualitySplit = None,
    max_length: o.MaxLength = None,
    max_samples: o.MaxSamples = None,
    calib_batches: Annotated[
        int | None,
        typer.Option(
            "--calib-batches",
            help="Calibration batches for GPTQ and reconstruction (default 16; 64 with --reconstruct-steps).",
        ),
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option("--batch-size", "-b", help="Batch size of calibration, QAT and evaluation (default 8)."),
    ] = None,
    eval_batches: Annotated[
        int | None, typer.Option("--eval-batches", help="Held-out batches per quality measurement (default 20).")
    ] = None,
    seed: o.Seed = None,
    device: o.Device = None,
    allow_pickle: o.AllowPickle = None,
    trust_remote_code: o.TrustRemoteCode = None,
    preset: o.Preset = None,
    config: o.ConfigFile = None,
    out: o.Out = None,
    overwrite: o.Overwrite = False,
    quiet: o.Quiet = False,
) -> None:
    """Quantize weights to int8/int4/int3/int2 (GPTQ or round-to-nearest, optionally with quantized distillation) or
    bitsandbytes formats, and write a low-bit artifact."""
    from distillkit.quantize import QuantizeConfig, quantize_model

    flags = dict(
        scheme=scheme,
        group_size=group_size,
        symmetric=symmetric,
        method=method,
        skip=tuple(skip) if skip else None,
        embeddings=embeddings,
        embedding_bits=embedding_bits,
        damp=damp,
        act_order=act_order,
        clip_search=clip_search,
        reconstruct_steps=reconstruct_steps,
        reconstruct_lr=reconstruct_lr,
        sensitive_fraction=sensitive_fraction,
        sensitive_bits=sensitive_bits,
        teacher=teacher,
        qat_steps=qat_steps,
        qat_lr=qat_lr,
        quantizer=quantizer,
        act_bits=act_bits,
        losses=tuple(loss) if loss else None,
        temperature=temperature,
        task=task,
        data=data,
        text_column=text_column,
        label_column=label_column,
        eval_split=eval_split,
        max_length=max_length,
        max_samples=max_samples,
        calib_batches=calib_batches,
        batch_size=batch_size,
        eval_batches=eval_batches,
        seed=seed,
        device=device,
        allow_pickle=allow_pickle,
        trust_remote_code=trust_remote_code,
    )
    cfg = QuantizeConfig.resolve(
        preset=preset, config_file=str(config) if config else None, overrides=flags, section="quantize"
    )
    manifest = quantize_model(cfg, model, out=str(out or o.default_out("quantize")), overwrite=overwrite)
    o.emit(manifest, quiet)


def register(app: typer.Typer) -> None:
    app.command("quantize", no_args_is_help=True)(quantize)
