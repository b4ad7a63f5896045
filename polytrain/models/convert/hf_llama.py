"""Hugging Face ``LlamaForCausalLM``, ``Qwen2ForCausalLM``, ``MistralForCausalLM`` <-> polytrain decoder-only.

One shape: RMSNorm, SwiGLU, RoPE, grouped-query attention.  polytrain's
``apply_rotary`` already rotates in Hugging Face's rotate-half layout (pair i
is channels i and i + D/2), so q and k rows need no permuting.  q, k, v stack
into polytrain's one projection, gate and up into its one SwiGLU input.  The
three differ in biases (Llama: ``attention_bias``, ``mlp_bias``; Qwen2: q/k/v
only; Mistral: none) and in sliding-window attention, which polytrain lacks:
it imports such a checkpoint with at most ``sliding_window`` positions, within
which full attention computes the same.
"""

from polytrain.config.model import BackboneConfig, EmbedConfig, ModelConfig
from polytrain.models.convert.family import Architecture, HFFamily, expect
from polytrain.models.convert.rules import ConversionError, Rule, same, stacked, tied
from polytrain.tokens import EmbedSpec

LLAMA_DEFAULTS = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=None, hidden_act="silu", max_position_embeddings=2048,
                      rms_norm_eps=1e-6, tie_word_embeddings=False, attention_bias=False, mlp_bias=False)
"""``LlamaConfig``'s defaults, for config files that leave keys out."""
ROPE_THETA = 10000.0
"""The RoPE base all three configs default to."""


def rope_base(c: dict, source: str) -> float:
    """``rope_theta`` from ``rope_parameters`` (transformers 5) or the top level (older files); plain RoPE only."""
    rope = {**c, **(c.get("rope_parameters") or c.get("rope_scaling") or {})}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
        raise ConversionError(f"{source} config rope_type={kind!r}: polytrain's RoPE has no frequency scaling "
                              "(it takes 'default')")
    expect(rope, "partial_rotary_factor", 1.0, "rotates every channel of a head", source)
    return float(rope.get("rope_theta", ROPE_THETA))


class LlamaLike(HFFamily):
    """What the three share; subclasses say which biases they have and how they slide attention windows."""

    defaults = LLAMA_DEFAULTS
    head = "decoder_only"
    base_prefix = "model."
    unused = r"\.rotary_emb\.inv_freq$"  # RoPE frequencies, a buffer files of older transformers saved

    def biases(self, c: dict) -> tuple[bool, bool, bool]:
        """(query/key/value, output, MLP) biases of a checkpoint with config ``c``."""
        return c["attention_bias"], c["attention_bias"], c["mlp_bias"]

    def window(self, c: dict) -> int | None:
        """The attention window of the sliding layers, or None when every layer attends to all earlier tokens."""
        return None

    def architecture(self, config: dict) -> Architecture:
        c = {**self.defaults, **config}
        dim, heads = c["hidden_size"], c["num_attention_heads"]
        expect(c, "hidden_act", "silu", "has SwiGLU (a silu gate) as its gated MLP", self.name)
        if c.get("head_dim") not in (None, dim // heads):
            raise ConversionError(f"{self.name} config head_dim={c['head_dim']}: polytrain's head dim is "
                                  f"hidden_size / num_attention_heads = {dim // heads}")
        qkv_bias, out_bias, mlp_bias = self.biases(c)
        backbone = BackboneConfig(dim=dim, n_heads=heads, n_kv_heads=c["num_key_value_heads"] or heads,
                                  encoder_layers=0, decoder_layers=c["num_hidden_layers"],
                                  mlp_width=c["intermediate_size"], mlp="swiglu", norm="rmsnorm",
                                  norm_eps=c["rms_norm_eps"], bias=False, qkv_bias=qkv_bias, out_bias=out_bias,
                                  mlp_bias=mlp_bias, position="rope", rope_base=rope_base(c, self.name))
        model = ModelConfig(backbone=backbone, embed=EmbedConfig(modality_vector=False),
                            tie_embeddings=c["tie_word_embeddings"])
        positions = min(c["max_position_embeddings"], self.window(c) or c["max_position_embeddings"])
        return Architecture(model, EmbedSpec("text", c["vocab_size"], (1, positions)), self.head)

    def settings(self, arch: Architecture) -> dict:
        b = arch.model.backbone
        return dict(vocab_size=arch.spec.input_dim, max_position_embeddings=arch.spec.grid[1], hidden_size=b.dim,
                    intermediate_size=b.mlp_hidden, num_hidden_layers=b.decoder_layers, num_attention_heads=b.n_heads,
                    num_key_value_heads=b.kv_heads, head_dim=b.head_dim, hidden_act="silu", rms_norm_eps=b.norm_eps,
                    rope_parameters={"rope_type": "default", "rope_theta": b.rope_base}, rope_theta=b.rope_base,
                    tie_word_embeddings=arch.model.tie_embeddings, attention_dropout=b.dropout,
                    **self.class_settings(b))

    def class_settings(self, b: BackboneConfig) -> dict:
        """The keys only this class has: Llama's bias flags; Qwen2's and Mistral's windows (written as full
        attention)."""
        qkv_bias, out_bias, mlp_bias = b.biases
        return dict(attention_bias=qkv_bias and out_bias, mlp_bias=mlp_bias)  # export checks the biases came back

    def rules(self, arch: Architecture, task: str) -> list[Rule]:
        b = arch.model.backbone
        table = "embedders.text.table.weight"
        if arch.model.tie_embeddings:
            rules = [tied(table, ("model.embed_tokens.weight", "lm_head.weight"))]
        else:
            rules = [same(table, "model.embed_tokens.weight"), same("lm_head.weight", "lm_head.weight")]
        rules.append(same("backbone.decoder.norm.weight", "model.norm.weight"))
        qkv_rows = (b.n_heads * b.head_dim, b.kv_heads * b.head_dim, b.kv_heads * b.head_dim)
        qkv_bias, out_bias, mlp_bias = b.biases
        for i in range(b.decoder_layers):
            ours, theirs = f"backbone.decoder.blocks.{i}", f"model.layers.{i}"
            rules += [same(f"{ours}.attn_norm.weight", f"{theirs}.input_layernorm.weight"),
                      same(f"{ours}.mlp_norm.weight", f"{theirs}.post_attention_layernorm.weight")]
            for kind, qkv, out, mlp in (("weight", True, True, True), ("bias", qkv_bias, out_bias, mlp_bias)):
                if qkv:
                    rules.append(stacked(f"{ours}.attn.qkv.{kind}",
                                         tuple(f"{theirs}.self_attn.{p}_proj.{kind}" for p in "qkv"), qkv_rows))
                if out:
                    rules.append(same(f"{ours}.attn.out.{kind}", f"{theirs}.self_attn.o_proj.{kind}"))
                if mlp:
                    rules += [stacked(f"{ours}.mlp.fc.{kind}", (f"{theirs}.mlp.gate_proj.{kind}",
                                                                f"{theirs}.mlp.up_proj.{kind}")),
                              same(f"{ours}.mlp.proj.{kind}", f"{theirs}.mlp.down_proj.{kind}")]
        return rules


class Llama(LlamaLike):
    name, model_type = "LlamaForCausalLM", "llama"


class Qwen2(LlamaLike):
    """Biases on q, k and v only; sliding windows on the layers from ``max_window_layers`` on, when enabled."""

    name, model_type = "Qwen2ForCausalLM", "qwen2"
    defaults = {**LLAMA_DEFAULTS, "vocab_size": 151936, "intermediate_size": 22016, "num_key_value_heads": 32,
                "max_position_embeddings": 32768, "use_sliding_window": False, "sliding_window": 4096,
                "max_window_layers": 28}

    def biases(self, c: dict) -> tuple[bool, bool, bool]:
        return True, False, False

    def window(self, c: dict) -> int | None:
        kinds = c.get("layer_types") or ["sliding_attention" if c["use_sliding_window"] and i >= c["max_window_layers"]
                                         else "full_attention" for i in range(c["num_hidden_layers"])]
        return c["sliding_window"] if "sliding_attention" in kinds else None

    def class_settings(self, b: BackboneConfig) -> dict:
        return dict(use_sliding_window=False, sliding_window=None, max_window_layers=0)


class Mistral(LlamaLike):
    """No biases; every layer slides a ``sliding_window`` (None: full attention)."""

    name, model_type = "MistralForCausalLM", "mistral"
    defaults = {**LLAMA_DEFAULTS, "intermediate_size": 14336, "num_key_value_heads": 8,
                "max_position_embeddings": 4096 * 32, "sliding_window": 4096}

    def biases(self, c: dict) -> tuple[bool, bool, bool]:
        return False, False, False

    def window(self, c: dict) -> int | None:
        return c["sliding_window"]

    def class_settings(self, b: BackboneConfig) -> dict:
        return dict(sliding_window=None)


LLAMA, QWEN2, MISTRAL = Llama(), Qwen2(), Mistral()
