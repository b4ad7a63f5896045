"""Weights of Hugging Face and timm checkpoints into polytrain models, and back out, one module per family.

``external`` is the entry point: a checkpoint in (``read_external``), a model
out (``write_external``); ``files`` reads and writes the libraries' folders
without unpickling; ``family`` derives a polytrain architecture from a
checkpoint's config and back; ``expressible`` checks an export says all of the
model; ``rules`` ties the tensors.  The families: ``hf_gpt2``, ``hf_llama``
(Llama, Qwen2, Mistral), ``hf_bert`` (masked LM, sequence classification),
``hf_bart``, ``timm_vit`` (the plain ViT, and CLIP, SigLIP, DINOv2 as image towers), ``hf_clip`` (CLIP and
SigLIP vision towers), ``hf_whisper`` (Whisper, whose encoder is an audio tower), ``hf_llava`` (LLaVA: a CLIP
or SigLIP tower, its projector, a Llama, Qwen2 or Mistral LM).  None of them imports ``transformers`` or ``timm``:
the files are read as they are.
"""

from polytrain.models.convert.external import ExternalCheckpoint, load_state, read_external, write_external
from polytrain.models.convert.family import Architecture
from polytrain.models.convert.rules import ConversionError

__all__ = ["Architecture", "ConversionError", "ExternalCheckpoint", "load_state", "read_external",
           "write_external"]
