"""Tiny Hugging Face and timm checkpoints, randomly initialized and saved the libraries' own way (nothing is
downloaded): what ``configs/compose.yaml``, ``configs/llava_stage1.yaml``, ``configs/audio_lm.yaml`` and
``configs/whisper.yaml`` start from, and what the end-to-end conversion tests fine-tune.

    python scripts/tiny_checkpoints.py checkpoints                  # every recipe's: vit_tiny.safetensors,
                                                                    # llama_tiny/, clip_tiny/, whisper_tiny/
    python scripts/tiny_checkpoints.py checkpoints gpt2 llava       # any of FAMILIES, each in its folder

A Hugging Face checkpoint is a ``save_pretrained`` folder with a byte-level BPE (BERT: WordPiece)
``tokenizer.json`` trained on ``CORPUS`` and its special tokens in ``tokenizer_config.json``, and the image
processor's or feature extractor's ``preprocessor_config.json`` where the model reads images or audio; a timm
one is a bare ``.safetensors`` file of ``timm.create_model(name, **args)``, or (CLIP, SigLIP, DINOv2) the
folder timm's ``save_for_hf`` writes (``config.json`` with the model's arguments and preprocessing, and
``model.safetensors``).  Every parameter gets N(0, 0.02) noise on top of the library's init, so no norm weight
or bias sits at a value (one, zero) that would hide a tensor mapped to the wrong place.
"""

import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

CORPUS = ["zero one two three four five six seven eight nine", "which digit is it? it is a seven, not a one.",
          "def f(x):\n    return x + 1\n", "the quick brown fox jumps over the lazy dog"] * 4
"""What the tiny tokenizers learn their merges from (the byte-level ones read any text anyway)."""
VOCAB = 320
"""Tokens of each tiny BPE vocabulary (the 256 bytes, a few merges, the special tokens)."""


@dataclass(frozen=True)
class Family:
    """A tiny checkpoint of one library class: its config, its tokenizer's special tokens by role."""

    library: str
    """``transformers`` class name, or ``timm``."""
    config: dict
    """The config's arguments (timm: ``create_model``'s)."""
    special: dict[str, str] = field(default_factory=dict)
    """Role (bos, eos, pad, mask, unk, cls, sep) -> token; empty for timm and for vision models (no tokenizer)."""
    wordpiece: bool = False
    extra: tuple[str, ...] = ()
    """Further special tokens of the tokenizer (Whisper's <|startoftranscript|>, LLaVA's <image>)."""
    ids: dict[str, str] = field(default_factory=dict)
    """Config key -> the token whose id it holds (``image_token_index``: ``<image>``)."""
    processor: tuple[str, dict] | None = None
    """The ``transformers`` image processor or feature extractor class and its arguments, saved beside."""
    timm_folder: bool = False
    """timm: the folder ``save_for_hf`` writes instead of a bare file."""


GPT = dict(bos="<|endoftext|>", eos="<|endoftext|>", unk="<|endoftext|>")
LLAMA = dict(bos="<s>", eos="</s>", unk="<unk>")
LLAMA_SHAPE = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=64)
FAMILIES = {
    "gpt2": Family("GPT2LMHeadModel", dict(n_embd=32, n_layer=2, n_head=4, n_positions=64), GPT),
    "llama": Family("LlamaForCausalLM", LLAMA_SHAPE, LLAMA),
    "qwen2": Family("Qwen2ForCausalLM", {**LLAMA_SHAPE, "tie_word_embeddings": True},
                    dict(eos="<|im_end|>", pad="<|endoftext|>", unk="<|endoftext|>")),
    "mistral": Family("MistralForCausalLM", {**LLAMA_SHAPE, "sliding_window": None}, LLAMA),
    "bert_mlm": Family("BertForMaskedLM", dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                               num_attention_heads=4, max_position_embeddings=64),
                       dict(pad="[PAD]", unk="[UNK]", cls="[CLS]", sep="[SEP]", mask="[MASK]"), wordpiece=True),
    "bart": Family("BartForConditionalGeneration", dict(d_model=32, encoder_layers=2, decoder_layers=2,
                                                        encoder_attention_heads=4, decoder_attention_heads=4,
                                                        encoder_ffn_dim=48, decoder_ffn_dim=48,
                                                        max_position_embeddings=64),
                   dict(bos="<s>", pad="<pad>", eos="</s>", unk="<unk>", mask="<mask>")),
    "vit": Family("timm", dict(model_name="vit_tiny_patch16_224", img_size=16, patch_size=8, in_chans=3,
                               embed_dim=32, depth=2, num_heads=2, num_classes=3)),
}
VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=16,
              patch_size=8, num_channels=3)
TIMM_TOWER = dict(img_size=16, patch_size=8, in_chans=3, embed_dim=32, depth=2, num_heads=2, num_classes=0)
WHISPER_SPECIAL = dict(bos="<|endoftext|>", eos="<|endoftext|>", pad="<|endoftext|>", unk="<|endoftext|>")
FAMILIES.update({
    "clip": Family("timm", dict(model_name="vit_base_patch16_clip_quickgelu_224", **TIMM_TOWER), timm_folder=True),
    "siglip": Family("timm", dict(model_name="vit_base_patch16_siglip_224", **TIMM_TOWER), timm_folder=True),
    "dinov2": Family("timm", dict(model_name="vit_small_patch14_reg4_dinov2", **TIMM_TOWER), timm_folder=True),
    "clip_vision": Family("CLIPVisionModel", VISION, processor=("CLIPImageProcessor", dict(
        size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}))),
    "siglip_vision": Family("SiglipVisionModel", VISION, processor=("SiglipImageProcessor", dict(
        size={"height": 16, "width": 16}))),
    "whisper": Family("WhisperForConditionalGeneration", dict(
        d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=48, decoder_ffn_dim=48, num_mel_bins=16, max_source_positions=50, max_target_positions=32,
        begin_suppress_tokens=None, suppress_tokens=None), WHISPER_SPECIAL, extra=("<|startoftranscript|>",),
        ids={"decoder_start_token_id": "<|startoftranscript|>"},
        processor=("WhisperFeatureExtractor", dict(feature_size=16, chunk_length=1))),
    "llava": Family("LlavaForConditionalGeneration", dict(
        vision_config=dict(model_type="clip_vision_model", **VISION),
        text_config=dict(model_type="llama", **LLAMA_SHAPE),
        image_seq_length=4), LLAMA, extra=("<image>",), ids={"image_token_index": "<image>"},
        processor=("CLIPImageProcessor", dict(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}))),
})
FAMILIES["bert_cls"] = Family("BertForSequenceClassification", {**FAMILIES["bert_mlm"].config, "num_labels": 2},
                              FAMILIES["bert_mlm"].special, wordpiece=True)
COMPOSE = {
    "vit_tiny": Family("timm", dict(model_name="vit_tiny_patch16_224", img_size=8, patch_size=4, in_chans=1,
                                    embed_dim=32, depth=2, num_heads=2, num_classes=10)),
    "llama_tiny": Family("LlamaForCausalLM", {**LLAMA_SHAPE, "hidden_size": 48, "intermediate_size": 96}, LLAMA),
    "clip_tiny": Family("CLIPVisionModel", {**VISION, "image_size": 8, "patch_size": 4, "num_channels": 1},
                        processor=("CLIPImageProcessor", dict(size={"shortest_edge": 8},
                                                              crop_size={"height": 8, "width": 8},
                                                              image_mean=[0.5], image_std=[0.5]))),
    "whisper_tiny": Family("WhisperForConditionalGeneration", {**FAMILIES["whisper"].config, "num_mel_bins": 64},
                           WHISPER_SPECIAL, extra=("<|startoftranscript|>",),
                           ids={"decoder_start_token_id": "<|startoftranscript|>"},
                           processor=("WhisperFeatureExtractor", dict(feature_size=64, chunk_length=1))),
}
"""What the recipes start from: a ViT and a CLIP for 8x8 grayscale digits, a Llama of another width, a Whisper
of 64 mel bins and 1 s (50 positions) for the spoken digits."""


def perturbed(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    return model.eval()


def tokenizer(family: Family):
    """A ``PreTrainedTokenizerFast`` trained on ``CORPUS`` with the family's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = list(dict.fromkeys([*family.special.values(), *family.extra]))
    if family.wordpiece:
        tok = Tokenizer(models.WordPiece(unk_token=family.special["unk"]))
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=VOCAB, special_tokens=specials, show_progress=False)
    else:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=specials, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **{f"{role}_token": t for role, t in family.special.items()},
                                   additional_special_tokens=list(family.extra))


def save(family: Family, out: Path, seed: int = 0) -> Path:
    """``family``'s tiny checkpoint under ``out``: a folder (Hugging Face) or ``out.safetensors`` (timm)."""
    torch.manual_seed(seed)
    if family.library == "timm":
        import timm
        from safetensors.torch import save_file
        from timm.models._hub import save_for_hf

        args = dict(family.config)
        model = perturbed(timm.create_model(args.pop("model_name"), pretrained=False, **args), seed)
        if family.timm_folder:
            save_for_hf(model, str(out), safe_serialization=True)
            return out
        path = out.with_suffix(".safetensors")
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(model.state_dict(), str(path))
        return path
    import transformers

    config, tok = dict(family.config), None
    if family.special:
        tok = tokenizer(family)
        ids = {f"{role}_token_id": tok.convert_tokens_to_ids(t) for role, t in family.special.items()
               if role in ("bos", "eos", "pad")}
        ids.update({key: tok.convert_tokens_to_ids(t) for key, t in family.ids.items()})
        vocab = {"vocab_size": len(tok)}
        if "text_config" in config:  # a composite model: the vocabulary is its language model's
            config["text_config"] = {**config["text_config"], **vocab, **ids}
            vocab = {}
        config.update(vocab, **ids)
    model_class = getattr(transformers, family.library)
    perturbed(model_class(model_class.config_class(**config)), seed).save_pretrained(out)
    if tok is not None:
        tok.save_pretrained(out)
    if family.processor is not None:
        name, args = family.processor
        getattr(transformers, name)(**args).save_pretrained(out)
    return out


def main(argv: list[str]) -> None:
    if not argv or argv[0].startswith("-"):
        sys.exit(__doc__)
    out, names = Path(argv[0]), argv[1:]
    table = {**FAMILIES, **COMPOSE}
    unknown = [name for name in names if name not in table]
    if unknown:
        sys.exit(f"unknown checkpoint {unknown[0]!r}; known: {', '.join(table)}")
    for name in names or COMPOSE:
        print(save(table[name], out / name))


if __name__ == "__main__":
    main(sys.argv[1:])
