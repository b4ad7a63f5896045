"""Every registry of named things, each with the built-in names it holds, declared once and here only.

A built-in is ``name -> "module:attribute"``: a config names and checks it without importing torch, and the
target is imported on its first lookup (``polytrain.registry.Registry``).  The modules that define the
objects do not register them.  Plugins add their own names through the entry-point ``group`` of a registry
(installed packages) or by ``REGISTRY.register(name)(obj)`` in a module a recipe lists under ``plugins``.
"""

from polytrain.registry import Registry

HEADS: Registry[type] = Registry("head", {
    "decoder_only": "polytrain.models.heads:DecoderOnlyHead",
    "encoder_decoder": "polytrain.models.heads:EncoderDecoderHead",
    "encoder_classifier": "polytrain.models.heads:EncoderClassifierHead",
    "masked_lm": "polytrain.models.heads:MaskedLMHead",
}, group="polytrain.heads")
"""Head class by name, as written in ``data.tasks.<task>.head``; built as ``cls(model_config, specs)``; its
``kind`` (``config.model.HeadKind``) says what it needs and which data layout its samples take."""

LAYOUTS: Registry[type] = Registry("data layout", {
    "causal": "polytrain.platform.data.layouts:Causal",
    "seq2seq": "polytrain.platform.data.layouts:SeqToSeq",
    "classify": "polytrain.platform.data.layouts:Classify",
    "masked": "polytrain.platform.data.layouts:Masked",
}, group="polytrain.layouts")
"""How a head's samples are laid out and collated, by the name a ``HeadKind.layout`` gives."""

EMBEDDERS: Registry[type] = Registry("embedder", {
    "text": "polytrain.models.embed:TokenEmbedder",
    "image": "polytrain.models.embed:PatchEmbedder",
    "audio": "polytrain.models.embed:PatchEmbedder",
}, group="polytrain.embedders")
"""Embedder class by modality; built as ``cls(spec, model_config)``."""

TOKENIZERS: Registry[type] = Registry("modality", {
    "text": "polytrain.tokenizers.text:TextTokenizer",
    "image": "polytrain.tokenizers.image:ImageTokenizer",
    "audio": "polytrain.tokenizers.audio:AudioTokenizer",
}, group="polytrain.tokenizers")
"""Tokenizer class by modality name: the built-in ones, then installed plugins."""

NORMS: Registry[type] = Registry("norm", {"layernorm": "torch.nn:LayerNorm", "rmsnorm": "torch.nn:RMSNorm"})
"""Normalization layer by name, built as ``NORMS.get(name)(dim, eps)``."""

MLPS: Registry[type] = Registry("mlp", {
    "gelu": "polytrain.models.layers:gelu_mlp",
    "gelu_tanh": "polytrain.models.layers:gelu_tanh_mlp",
    "quick_gelu": "polytrain.models.layers:quick_gelu_mlp",
    "relu": "polytrain.models.layers:relu_mlp",
    "swiglu": "polytrain.models.layers:SwiGLU",
})
"""MLP by name, built as ``MLPS.get(name)(dim, hidden, bias, dropout)``."""

KERNELS: Registry = Registry("attention kernel", {
    "sdpa": "polytrain.models.attention:SDPA_ANY",
    "sdpa_flash": "polytrain.models.attention:SDPA_FLASH",
    "sdpa_cudnn": "polytrain.models.attention:SDPA_CUDNN",
    "sdpa_efficient": "polytrain.models.attention:SDPA_EFFICIENT",
    "sdpa_math": "polytrain.models.attention:SDPA_MATH",
    "flex": "polytrain.models.attention:FLEX",
    "flash_attn": "polytrain.models.attention:FLASH_ATTN",
})
"""Attention kernel by name; ``auto`` is resolved by ``attention.plan_attention``."""

POSITIONS: Registry = Registry("position encoding", {
    "learned": "polytrain.config.model:LEARNED",
    "sinusoidal": "polytrain.config.model:SINUSOIDAL",
    "rope": "polytrain.config.model:ROPE",
    "alibi": "polytrain.config.model:ALIBI",
})
"""``PositionKind`` by name, as written in ``model.backbone.position``."""

STRATEGIES: Registry = Registry("decoding strategy", {
    "greedy": "polytrain.models.generation:greedy",
    "sample": "polytrain.models.generation:sample",
    "beam": "polytrain.models.generation:beam_search",
})
"""Decoding function by ``model.heads.decoding.strategy``."""

NORMALIZATIONS: Registry = Registry("image normalization", {
    "imagenet": "polytrain.config.tokenizers:IMAGENET",
    "inception": "polytrain.config.tokenizers:INCEPTION",
    "openai_clip": "polytrain.config.tokenizers:OPENAI_CLIP",
    "dpn": "polytrain.config.tokenizers:DPN",
})
"""(mean, std) presets by name: timm's (``timm.data.constants``)."""

PRESETS: Registry = Registry("model preset", {name: f"polytrain.config.presets:{name.upper()}" for name in (
    "tiny", "small", "base", "large", "decoder_1b", "vit_tiny_patch16_224", "vit_base_patch16_224", "gpt2",
    "bert_base", "bart_base")})
"""``config.presets.Preset`` by name, as written in ``model.preset``."""

FAMILIES: Registry = Registry("checkpoint family", {
    **{name: "polytrain.models.convert.hf_gpt2:GPT2_LM_HEAD" for name in ("GPT2LMHeadModel", "gpt2")},
    **{name: "polytrain.models.convert.hf_llama:LLAMA" for name in ("LlamaForCausalLM", "llama")},
    **{name: "polytrain.models.convert.hf_llama:QWEN2" for name in ("Qwen2ForCausalLM", "qwen2")},
    **{name: "polytrain.models.convert.hf_llama:MISTRAL" for name in ("MistralForCausalLM", "mistral")},
    **{name: "polytrain.models.convert.hf_bert:BERT_MASKED_LM" for name in ("BertForMaskedLM",)},
    "BertForSequenceClassification": "polytrain.models.convert.hf_bert:BERT_CLASSIFIER",
    **{name: "polytrain.models.convert.hf_bart:BART" for name in ("BartForConditionalGeneration", "bart")},
    "timm": "polytrain.models.convert.timm_vit:TIMM_VIT",
    **{name: "polytrain.models.convert.hf_clip:CLIP_VISION" for name in ("CLIPVisionModel", "clip_vision_model")},
    **{name: "polytrain.models.convert.hf_clip:CLIP" for name in ("CLIPModel", "clip")},
    **{name: "polytrain.models.convert.hf_clip:SIGLIP_VISION" for name in ("SiglipVisionModel", "siglip_vision_model")},
    **{name: "polytrain.models.convert.hf_clip:SIGLIP" for name in ("SiglipModel", "siglip")},
    **{name: "polytrain.models.convert.hf_whisper:WHISPER" for name in ("WhisperForConditionalGeneration", "whisper")},
    **{name: "polytrain.models.convert.hf_llava:LLAVA" for name in ("LlavaForConditionalGeneration", "llava")},
})
"""Checkpoint families by Hugging Face ``architectures[0]`` and ``model_type``, and ``timm`` (its plain ViT, and
its CLIP, SigLIP and DINOv2 ViTs as image towers)."""

BUILTINS: Registry = Registry("builtin dataset", {name: f"polytrain.platform.data.builtin:{name}" for name in (
    "digits_image", "spoken_digits", "digits_image_qa", "spoken_digits_qa", "long_spoken_digits", "stdlib")},
                              group="polytrain.datasets")
"""``builtin:<name>/<split>`` datasets: a function writing the files into a folder, returning each split's lines."""

BACKENDS: Registry = Registry("launch backend", {name: f"polytrain.launch.{name}:BACKEND" for name in (
    "torchrun", "deepspeed", "slurm")}, group="polytrain.launchers")
"""Launchers by ``launch.backend``: a ``launch.backends.Backend`` (checks, dry-run description, run)."""
