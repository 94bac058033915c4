"""Tiny models built from configs, saved with a matching tokenizer or image processor, for offline tests.

Every builder returns ``(model, path)``: the model in eval mode and a ``save_pretrained`` directory that
``AutoModel*.from_pretrained`` and ``AutoTokenizer`` / ``AutoImageProcessor`` load without network. Weights are
seeded (``seed``), dropout is off so outputs are deterministic, and norm weights and biases are perturbed away
from their 1/0 initialisation so that magnitude rankings and LayerNorm slicing are actually exercised.
Keyword overrides go into the config, e.g. ``tiny_llama(tie_word_embeddings=True)``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

VOCAB_SIZE = 128
MAX_POSITIONS = 128
IMAGE_SIZE = 32

# Frequent English words, so that real sentences map to real ids rather than all to <unk>.
_WORDS = (
    ". , ! ? ' \" - : ; ( ) the of and to a in is it that was he for on are as with his they i at be this have "
    "from or one had by word but not what all were we when your can said there use an each which she do how "
    "their if will up other about out many then them these so some her would make like him into time has look "
    "two more write go see number no way could people my than first water been call who oil its now find long "
    "down day did get come made may part over new sound take only little work know place year live me back give "
    "most very after thing our just name good sentence man think say great where help through much before line "
    "right too mean old any same tell boy follow came want show also around form three small set put end does "
    "another well large must big even such because turn here why ask went men read need land different home us "
    "move try kind hand picture again change off play spell air away animal house point page letter mother answer"
).split()


def _out_dir(save_dir: str | Path | None, name: str) -> Path:
    path = Path(save_dir) if save_dir is not None else Path(tempfile.mkdtemp(prefix=f"distillkit-tiny-{name}-"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def _vocab(specials: list[str], size: int) -> dict[str, int]:
    words = list(specials) + [w for w in _WORDS if w not in specials]
    words += [f"w{i}" for i in range(max(0, size - len(words)))]
    return {w: i for i, w in enumerate(words[:size])}


def _text_tokenizer(kind: str, size: int, max_length: int) -> Any:
    """A WordLevel tokenizer (lower-cased, whitespace/punctuation split) with exactly ``size`` ids."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if kind == "bert":
        specials = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]"}
        specials["mask_token"] = "[MASK]"
    else:
        specials = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    vocab = _vocab(list(specials.values()), size)
    tok = Tokenizer(models.WordLevel(vocab, unk_token=specials["unk_token"]))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")
    if kind == "bert":
        cls, sep = vocab["[CLS]"], vocab["[SEP]"]
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
        )
    elif kind == "llama":
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
        )
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=max_length, **specials)


def _image_processor(size: int) -> Any:
    # The default ViTImageProcessor wants torchvision and warns without it; the PIL one needs only Pillow.
    try:
        from transformers import ViTImageProcessorPil as processor_cls
    except ImportError:
        from transformers import ViTImageProcessor as processor_cls
    return processor_cls(size={"height": size, "width": size})


def _perturb(model: Any, seed: int) -> None:
    import torch

    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() != 1:
                continue
            if torch.all(p == 1):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
            elif torch.all(p == 0):
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))


def _build(cls: Any, config: Any, seed: int) -> Any:
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config)
    _perturb(model, seed)
    return model.eval()


def _save(model: Any, processor: Any, save_dir: str | Path | None, name: str) -> tuple[Any, str]:
    path = _out_dir(save_dir, name)
    model.save_pretrained(path)
    if processor is not None:
        processor.save_pretrained(path)
    return model, str(path)


def tiny_llama(save_dir: str | Path | None = None, *, seed: int = 0, **overrides: Any) -> tuple[Any, str]:
    """LlamaForCausalLM with GQA: hidden 64, 4 heads of 16, 2 kv heads, 4 layers, MLP 128, vocab 128."""
    model, vocab = _llama_model(seed, overrides)
    return _save(model, _text_tokenizer("llama", vocab, MAX_POSITIONS), save_dir, "llama")


def _llama_model(seed: int, overrides: dict[str, Any], **sizes: Any) -> tuple[Any, int]:
    """The tiny LlamaForCausalLM (``sizes`` change the defaults, then ``overrides``) and its vocabulary size."""
    from transformers import LlamaConfig, LlamaForCausalLM

    kwargs = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=MAX_POSITIONS,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    kwargs.update(sizes)
    kwargs.update(overrides)
    return _build(LlamaForCausalLM, LlamaConfig(**kwargs), seed), kwargs["vocab_size"]


def tiny_gpt2(save_dir: str | Path | None = None, *, seed: int = 0, **overrides: Any) -> tuple[Any, str]:
    """GPT2LMHeadModel (tied head): hidden 64, 4 heads, 4 layers, MLP 256, vocab 128, 128 positions."""
    from transformers import GPT2Config, GPT2LMHeadModel

    kwargs = dict(
        vocab_size=VOCAB_SIZE,
        n_positions=MAX_POSITIONS,
        n_embd=64,
        n_layer=4,
        n_head=4,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    kwargs.update(overrides)
    model = _build(GPT2LMHeadModel, GPT2Config(**kwargs), seed)
    return _save(model, _text_tokenizer("gpt2", kwargs["vocab_size"], MAX_POSITIONS), save_dir, "gpt2")


def _bert_config(overrides: dict[str, Any]) -> Any:
    from transformers import BertConfig

    kwargs = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=MAX_POSITIONS,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=0,
    )
    kwargs.update(overrides)
    return BertConfig(**kwargs)


def tiny_bert(save_dir: str | Path | None = None, *, seed: int = 0, **overrides: Any) -> tuple[Any, str]:
    """BertModel with pooler (a MiniLM-style sentence encoder): hidden 64, 4 heads, 4 layers, MLP 128, vocab 128."""
    from transformers import BertModel

    config = _bert_config(overrides)
    model = _build(BertModel, config, seed)
    return _save(model, _text_tokenizer("bert", config.vocab_size, MAX_POSITIONS), save_dir, "bert")


def tiny_bert_mlm(save_dir: str | Path | None = None, *, seed: int = 0, **overrides: Any) -> tuple[Any, str]:
    """BertForMaskedLM (decoder tied to the word embeddings), same sizes as :func:`tiny_bert`."""
    from transformers import BertForMaskedLM

    config = _bert_config(overrides)
    model = _build(BertForMaskedLM, config, seed)
    return _save(model, _text_tokenizer("bert", config.vocab_size, MAX_POSITIONS), save_dir, "bert-mlm")


def tiny_bert_cls(save_dir: str | Path | None = None, *, seed: int = 0, **overrides: Any) -> tuple[Any, str]:
    """BertForSequenceClassification with 3 labels, same sizes as :func:`tiny_bert`."""
    from transformers import BertForSequenceClassification

    overrides.setdefault("num_labels", 3)
    config = _bert_config(overrides)
    model = _build(BertForSequenceClassification, config, seed)
    return _save(model, _text_tokenizer("bert", config.vocab_size, MAX_POSITIONS), save_dir, "bert-cls")


def tiny_vit(save_dir: str | Path | None = None, *, seed: int = 0, **overrides: Any) -> tuple[Any, str]:
    """ViTForImageClassification: 32x32 RGB, patch 8 (16 patches + CLS), hidden 64, 4 heads, 4 layers, 3 labels."""
    from transformers import ViTConfig, ViTForImageClassification

    kwargs = dict(
        image_size=IMAGE_SIZE,
        patch_size=8,
        num_channels=3,
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=128,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=3,
        id2label={0: "cat", 1: "dog", 2: "bird"},
        label2id={"cat": 0, "dog": 1, "bird": 2},
    )
    kwargs.update(overrides)
    model = _build(ViTForImageClassification, ViTConfig(**kwargs), seed)
    size = kwargs["image_size"]
    return _save(model, _image_processor(size), save_dir, "vit")


def tiny_vit_model(save_dir: str | Path | None = None, *, seed: int = 0, **overrides: Any) -> tuple[Any, str]:
    """ViTModel (with pooler), same sizes as :func:`tiny_vit`."""
    from transformers import ViTConfig, ViTModel

    kwargs = dict(
        image_size=IMAGE_SIZE,
        patch_size=8,
        num_channels=3,
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=128,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    kwargs.update(overrides)
    model = _build(ViTModel, ViTConfig(**kwargs), seed)
    size = kwargs["image_size"]
    return _save(model, _image_processor(size), save_dir, "vit-model")


def tiny_resnet(save_dir: str | Path | None = None, *, seed: int = 0, **overrides: Any) -> tuple[Any, str]:
    """ResNetForImageClassification: 32x32 RGB, basic blocks, stem 16, stages [16, 32] of depths [1, 2], 3 labels.

    The stem is as wide as stage 0, so their shortcut is the identity (residual-coupled channels);
    ``layer_type="bottleneck", hidden_sizes=[32, 64]`` gives bottleneck blocks with projection shortcuts.
    """
    from transformers import ResNetConfig, ResNetForImageClassification

    kwargs = dict(
        num_channels=3,
        embedding_size=16,
        hidden_sizes=[16, 32],
        depths=[1, 2],
        layer_type="basic",
        num_labels=3,
        id2label={0: "cat", 1: "dog", 2: "bird"},
        label2id={"cat": 0, "dog": 1, "bird": 2},
    )
    kwargs.update(overrides)
    model = _build(ResNetForImageClassification, ResNetConfig(**kwargs), seed)
    return _save(model, _image_processor(IMAGE_SIZE), save_dir, "resnet")


def sample_inputs(model: Any, batch: int = 2, length: int = 8, seed: int = 0) -> dict[str, Any]:
    """Model inputs for ``model``'s family: ``input_ids``/``attention_mask`` [B, T] (the last row padded after
    ``length - 2`` tokens) or ``pixel_values`` [B, 3, S, S]."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    cfg = model.config
    if getattr(cfg, "model_type", None) in ("vit", "resnet"):
        size = getattr(cfg, "image_size", IMAGE_SIZE)
        return {"pixel_values": torch.randn(batch, cfg.num_channels, size, size, generator=gen)}
    ids = torch.randint(5, cfg.vocab_size, (batch, length), generator=gen)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[-1, length - 2 :] = 0
    return {"input_ids": ids, "attention_mask": mask}


# --------------------------------------------------------------------------------------------
# diffusers denoisers, saved as a model directory with their scheduler in ``scheduler/``


def _tiny_scheduler(prediction_type: str) -> Any:
    from diffusers import DDIMScheduler

    # clip_sample off: a random teacher's x0 estimates are not in [-1, 1], and clipping would saturate every
    # sample into the same corners, which would make "the student is close to the teacher" trivially true
    return DDIMScheduler(
        num_train_timesteps=1000, beta_schedule="linear", prediction_type=prediction_type, clip_sample=False
    )


def _diffusers_model(cls: Any, kwargs: dict[str, Any], seed: int, prediction_type: str, save_dir: Any, name: str):
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(**kwargs)
    _perturb(model, seed)
    model.eval()
    path = _out_dir(save_dir, name)
    model.save_pretrained(path)
    _tiny_scheduler(prediction_type).save_pretrained(path / "scheduler")
    return model, str(path)


def _unet_kwargs(overrides: dict[str, Any]) -> dict[str, Any]:
    kwargs: dict[str, Any] = dict(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(16, 32),
        norm_num_groups=8,
        attention_head_dim=8,
    )
    kwargs.update(overrides)
    return kwargs


def tiny_unet(
    save_dir: str | Path | None = None, *, seed: int = 0, prediction_type: str = "v_prediction", **overrides: Any
) -> tuple[Any, str]:
    """Unconditional UNet2DModel on 3x8x8 pixels: blocks (16, 32), self-attention at 4x4; DDIM scheduler."""
    from diffusers import UNet2DModel

    kwargs = _unet_kwargs(
        dict(down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    )
    kwargs.update(overrides)
    return _diffusers_model(UNet2DModel, kwargs, seed, prediction_type, save_dir, "unet")


def tiny_unet_class_cond(
    save_dir: str | Path | None = None, *, seed: int = 0, prediction_type: str = "v_prediction", **overrides: Any
) -> tuple[Any, str]:
    """Class-conditional UNet2DConditionModel on 3x8x8 pixels, 5 class embeddings (4 classes plus the null class
    4 that classifier-free guidance uses), no cross-attention: blocks (16, 32) with self-attention; DDIM scheduler."""
    from diffusers import UNet2DConditionModel

    kwargs = _unet_kwargs(
        dict(
            down_block_types=("DownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "UpBlock2D"),
            mid_block_type="UNetMidBlock2D",
            num_class_embeds=5,
            cross_attention_dim=16,
        )
    )
    kwargs.update(overrides)
    return _diffusers_model(UNet2DConditionModel, kwargs, seed, prediction_type, save_dir, "unet-cond")


def tiny_dit(
    save_dir: str | Path | None = None, *, seed: int = 0, prediction_type: str = "v_prediction", **overrides: Any
) -> tuple[Any, str]:
    """Class-conditional DiTTransformer2DModel on 4x8x8 latents: patch 2 (16 tokens), 2 layers of 2 heads x 16,
    4 classes (null class 4, as DiT's label embedding adds one); DDIM scheduler."""
    from diffusers import DiTTransformer2DModel

    kwargs: dict[str, Any] = dict(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        num_attention_heads=2,
        attention_head_dim=16,
        num_embeds_ada_norm=4,
        norm_num_groups=8,
    )
    kwargs.update(overrides)
    return _diffusers_model(DiTTransformer2DModel, kwargs, seed, prediction_type, save_dir, "dit")


def tiny_text_unet_pipeline(
    save_dir: str | Path | None = None, *, seed: int = 0, prediction_type: str = "v_prediction"
) -> tuple[Any, str]:
    """Text-conditioned pipeline directory on 3x8x8 pixels (no VAE): UNet2DConditionModel with cross-attention
    (cross_attention_dim 16, blocks (16, 32)), a 2-layer CLIPTextModel (hidden 16, 8 positions), a CLIPTokenizer
    over a tiny byte-level BPE vocabulary written here, and a DDIM scheduler; saved by StableDiffusionPipeline.

    Returns ``(pipeline, path)``.
    """
    import json

    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    path = _out_dir(save_dir, "text-pipe")
    # CLIP's BPE: every printable byte is a token, "</w>" marks a word end; a few merges make whole words
    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab_list = ["<|startoftext|>", "<|endoftext|>", *chars, *[c + "</w>" for c in chars]]
    merges = ["c a", "ca t</w>", "d o", "do g</w>", "r e", "re d</w>"]
    vocab_list += ["ca", "cat</w>", "do", "dog</w>", "re", "red</w>"]
    tok_dir = path / ".tokenizer-src"
    tok_dir.mkdir(exist_ok=True)
    (tok_dir / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab_list)}))
    (tok_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer(
        str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=8, pad_token="<|endoftext|>"
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(vocab_list),
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                max_position_embeddings=8,
                bos_token_id=0,
                eos_token_id=1,
                pad_token_id=1,
            )
        ).eval()
        unet = UNet2DConditionModel(
            **_unet_kwargs(
                dict(
                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                    cross_attention_dim=16,
                )
            )
        )
    _perturb(unet, seed)
    unet.eval()
    pipe = StableDiffusionPipeline(
        vae=None,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=_tiny_scheduler(prediction_type),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path)
    import shutil

    shutil.rmtree(tok_dir)
    return pipe, str(path)


# --------------------------------------------------------------------------------------------
# a causal LM with a second, different vocabulary (cross-tokenizer distillation)


def tiny_llama_other_vocab(
    save_dir: str | Path | None = None, *, seed: int = 0, vocab_size: int = 96, **overrides: Any
) -> tuple[Any, str]:
    """Tiny Llama (hidden 32, 2 layers) whose tokenizer has another vocabulary than ``tiny_llama``/``tiny_gpt2``.

    WordLevel over the same frequent words but in reverse alphabetical order and cut to ``vocab_size`` ids, so the
    same word has a different id, some words are ``<unk>`` here only, and the specials sit at 0..3 as before.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    words = list(specials.values()) + sorted(set(_WORDS), reverse=True)
    words += [f"v{i}" for i in range(max(0, vocab_size - len(words)))]
    vocab = {w: i for i, w in enumerate(words[:vocab_size])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=MAX_POSITIONS, **specials)
    model, _ = _llama_model(
        seed, overrides, vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1,
    )  # fmt: skip
    return _save(model, fast, save_dir, "llama-other-vocab")
