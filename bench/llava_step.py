"""A LLaVA-shaped training step (image tower + projector + LM): polytrain beside transformers' own
``LlavaForConditionalGeneration`` and beside the same model wired by hand from timm and transformers.

All three hold a CLIP ViT (pre-norm, QuickGELU, class token), LLaVA-1.5's two-layer GELU projector and a Llama
LM; polytrain's is read from the transformers model's checkpoint (``polytrain.models.convert``), so they hold
the same weights; the timm + transformers one (timm's ``vit_*_clip_quickgelu_*``, an ``nn.Sequential``
projector, ``LlamaForCausalLM`` fed ``inputs_embeds``) has the same shapes.  Each step is stage 2 of LLaVA's
recipe: the tower frozen, the projector and the LM trained, cross-entropy on the text after the image (one
image token per patch, as LLaVA lays them out).  The features come from the tower's last layer
(``vision_feature_layer: -1``) so every model computes the same blocks (with LLaVA's default -2 polytrain
builds no last block at all, since nothing reads it).  The models take turns step by step; the figures are
the median wall-clock and CPU time of a step.  Goal: polytrain <= 1.0x each.

    python bench/llava_step.py [--steps 10] [--batch 4] [--image 224] [--text 64] [--threads N] [--device cuda]

Last line: one JSON object with the figures.
"""

import argparse
import json
import tempfile
from pathlib import Path
from typing import Callable

import timm
import torch
import torch.nn.functional as F
import transformers
from side_by_side import race

from polytrain.models.convert.external import read_external
from polytrain.models.heads import text_segment
from polytrain.tokenizers.image import patchify
from polytrain.tokens import IGNORE_INDEX, Segment, Spans, TaskBatch

VISION = dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=6, patch_size=16,
              hidden_act="quick_gelu")
TEXT = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=4,
            vocab_size=8192, max_position_embeddings=1024)
IMAGE_TOKEN = TEXT["vocab_size"] - 1


def llava(image: int) -> transformers.LlavaForConditionalGeneration:
    config = transformers.LlavaConfig(vision_config=dict(model_type="clip_vision_model", image_size=image, **VISION),
                                      text_config=dict(model_type="llama", **TEXT), image_token_index=IMAGE_TOKEN,
                                      vision_feature_layer=-1, image_seq_length=(image // 16) ** 2)
    return transformers.LlavaForConditionalGeneration(config)


def timm_and_transformers(image: int) -> tuple[torch.nn.Module, torch.nn.Module, transformers.LlamaForCausalLM]:
    """The same shapes wired by hand: a timm CLIP ViT, a projector, a transformers Llama."""
    vit = timm.create_model("vit_base_patch16_clip_quickgelu_224", pretrained=False, img_size=image, num_classes=0,
                            embed_dim=VISION["hidden_size"], depth=VISION["num_hidden_layers"],
                            num_heads=VISION["num_attention_heads"])
    width = TEXT["hidden_size"]
    projector = torch.nn.Sequential(torch.nn.Linear(VISION["hidden_size"], width), torch.nn.GELU(),
                                    torch.nn.Linear(width, width))
    lm = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TEXT))
    return vit, projector, lm


def inputs(batch: int, image: int, text: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pixels, ids: bos, one image token per patch, text; labels of the text's next tokens, -100 before it)."""
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(batch, 3, image, image, generator=g)
    patches = (image // 16) ** 2
    ids = torch.randint(3, IMAGE_TOKEN - 1, (batch, 1 + patches + text), generator=g)
    ids[:, 0], ids[:, 1: 1 + patches] = 1, IMAGE_TOKEN
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, patches + 1: -1] = ids[:, patches + 2:]  # each text position's next token
    return pixels, ids, labels


def trainable(modules: list[torch.nn.Module], frozen: torch.nn.Module) -> torch.optim.Optimizer:
    for p in frozen.parameters():
        p.requires_grad_(False)
    return torch.optim.AdamW([p for m in modules for p in m.parameters() if p.requires_grad], lr=1e-4)


def stepper(optimizer: torch.optim.Optimizer, loss: Callable[[], torch.Tensor]) -> Callable[[], None]:
    def run() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss().backward()
        optimizer.step()

    return run


def steps(batch: int, image: int, text: int, device: torch.device) -> dict[str, Callable[[], None]]:
    torch.manual_seed(0)
    reference = llava(image)
    pixels, ids, labels = (t.to(device) for t in inputs(batch, image, text))
    hf_labels = torch.cat([torch.full_like(labels[:, :1], IGNORE_INDEX), labels[:, :-1]], 1)  # transformers shifts
    hf_optimizer = trainable([reference], reference.model.vision_tower)
    run = {"transformers_llava": stepper(hf_optimizer, lambda: reference(input_ids=ids, pixel_values=pixels,
                                                                         labels=hf_labels).loss)}
    with tempfile.TemporaryDirectory() as tmp:
        reference.save_pretrained(tmp)
        ours = read_external(Path(tmp)).build("vqa").to(device).train()
    reference.to(device).train()
    patches = Segment.collate([patchify(p, 16) for p in pixels.cpu()])
    segment = text_segment(ids.cpu())
    segment.spans = {"image": Spans(patches, torch.arange(batch), torch.ones(batch, dtype=torch.long))}
    task = {"vqa": TaskBatch(segment, labels.cpu()).to(device)}
    run["polytrain"] = stepper(trainable([ours], ours.embedders["image"].tower), lambda: ours(task)["vqa"])
    vit, projector, lm = (m.to(device).train() for m in timm_and_transformers(image))
    table = lm.get_input_embeddings()
    image_slots = ids == IMAGE_TOKEN

    def wired_loss() -> torch.Tensor:
        features = projector(vit.forward_features(pixels)[:, 1:])
        embeds = table(ids).masked_scatter(image_slots[..., None], features.to(table.weight.dtype))
        logits = lm(inputs_embeds=embeds).logits
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX)

    run["timm_transformers"] = stepper(trainable([projector, lm], vit), wired_loss)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per model")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--image", type=int, default=224, help="image side in pixels (16-pixel patches)")
    parser.add_argument("--text", type=int, default=64, help="text tokens after the image")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, timm {timm.__version__}, "
          f"{torch.get_num_threads()} threads, {device}; batch {args.batch}, {(args.image // 16) ** 2} image tokens "
          f"+ {args.text + 1} text tokens; median of {args.steps} steps each")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    timings = race(steps(args.batch, args.image, args.text, device), args.steps, warmup=2, sync=sync)
    ours = timings["polytrain"]
    for name, t in timings.items():
        print(f"{name:20s} wall {1000 * t.wall:8.1f} ms   cpu {1000 * t.cpu:8.1f} ms   "
              f"polytrain / this: wall {ours.wall / t.wall:4.2f}x, cpu {ours.cpu / t.cpu:4.2f}x")
    peers = [name for name in timings if name != "polytrain"]
    print(json.dumps({"device": str(device), "batch": args.batch, "image_tokens": (args.image // 16) ** 2,
                      "wall_ms": {k: round(1000 * t.wall, 1) for k, t in timings.items()},
                      "cpu_ms": {k: round(1000 * t.cpu, 1) for k, t in timings.items()},
                      "ratio": {k: round(ours.wall / timings[k].wall, 3) for k in peers},
                      "ratio_cpu_time": {k: round(ours.cpu / timings[k].cpu, 3) for k in peers},
                      "goal": "polytrain <= 1.0x each"}))


if __name__ == "__main__":
    main()
