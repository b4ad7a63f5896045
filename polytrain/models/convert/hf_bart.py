"""Hugging Face ``BartForConditionalGeneration`` <-> polytrain encoder-decoder.

Post-norm, GELU, a LayerNorm on each stack's embeddings, one token table for
both stacks and the output, and a learned position table per stack whose first
two rows no position reads (``BartLearnedPositionalEmbedding.offset``).
polytrain's stacks share one block shape, so BART's encoder and decoder must
agree in heads and MLP width.  ``final_logits_bias`` is a buffer that stays
zero (nothing trains it), accepted only so.
"""

from polytrain.config.model import BackboneConfig, EmbedConfig, ModelConfig
from polytrain.models.convert.family import (
    Architecture,
    HFFamily,
    expect,
    hf_activation_to_mlp,
    mlp_to_hf_activation,
)
from polytrain.models.convert.rules import ConversionError, Rule, offset_rows, same, stacked, tied
from polytrain.tokens import EmbedSpec

DEFAULTS = dict(vocab_size=50265, max_position_embeddings=1024, d_model=1024, encoder_layers=12, decoder_layers=12,
                encoder_attention_heads=16, decoder_attention_heads=16, encoder_ffn_dim=4096, decoder_ffn_dim=4096,
                activation_function="gelu", scale_embedding=False, tie_word_embeddings=True)
"""``BartConfig``'s defaults, for config files that leave keys out."""
POSITION_OFFSET = 2
"""BART's position tables start at row 2."""


class Bart(HFFamily):
    name, model_type, head = "BartForConditionalGeneration", "bart", "encoder_decoder"
    base_prefix = "model."
    unused = r"^model\.(en|de)coder\.version$"  # fairseq's leftovers in converted files

    def architecture(self, config: dict) -> Architecture:
        c = {**DEFAULTS, **config}
        # untied, transformers 5 gives each stack a token table of its own, and polytrain's text embedder has one
        expect(c, "tie_word_embeddings", True, "keeps one token table for both stacks and the output", self.name)
        for key in ("attention_heads", "ffn_dim"):
            if c[f"encoder_{key}"] != c[f"decoder_{key}"]:
                raise ConversionError(f"{self.name} config decoder_{key}={c[f'decoder_{key}']} differs from "
                                      f"encoder_{key}={c[f'encoder_{key}']}: polytrain's two stacks share one "
                                      "block shape")
        backbone = BackboneConfig(dim=c["d_model"], n_heads=c["encoder_attention_heads"],
                                  encoder_layers=c["encoder_layers"], decoder_layers=c["decoder_layers"],
                                  mlp_width=c["encoder_ffn_dim"], norm_position="post", embed_norm=True,
                                  mlp=hf_activation_to_mlp(c["activation_function"], "activation_function", self.name))
        embed = EmbedConfig(modality_vector=False, scale_tokens=c["scale_embedding"], decoder_positions=True)
        model = ModelConfig(backbone=backbone, embed=embed)
        return Architecture(model, EmbedSpec("text", c["vocab_size"], (1, c["max_position_embeddings"])),
                            self.head)

    def settings(self, arch: Architecture) -> dict:
        b = arch.model.backbone
        return dict(vocab_size=arch.spec.input_dim, max_position_embeddings=arch.spec.grid[1], d_model=b.dim,
                    encoder_layers=b.encoder_layers, decoder_layers=b.decoder_layers, encoder_attention_heads=b.n_heads,
                    decoder_attention_heads=b.n_heads, encoder_ffn_dim=b.mlp_hidden, decoder_ffn_dim=b.mlp_hidden,
                    activation_function=mlp_to_hf_activation(b.mlp, self.name),
                    scale_embedding=arch.model.embed.scale_tokens,
                    tie_word_embeddings=True, dropout=b.dropout, attention_dropout=b.dropout,
                    activation_dropout=0.0, is_encoder_decoder=True)

    def zeros(self, arch: Architecture) -> dict[str, tuple[int, ...]]:
        return {"final_logits_bias": (1, arch.spec.input_dim)}

    def rules(self, arch: Architecture, task: str) -> list[Rule]:
        tables = ("model.shared.weight", "model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight",
                  "lm_head.weight")
        rules = [tied("embedders.text.table.weight", tables),
                 offset_rows("embedders.text.position.weight", "model.encoder.embed_positions.weight", POSITION_OFFSET),
                 offset_rows("embedders.text.decoder_position.weight", "model.decoder.embed_positions.weight",
                             POSITION_OFFSET)]
        b = arch.model.backbone
        for stack, n_layers in (("encoder", b.encoder_layers), ("decoder", b.decoder_layers)):
            for kind in ("weight", "bias"):
                rules.append(same(f"backbone.{stack}.input_norm.{kind}", f"model.{stack}.layernorm_embedding.{kind}"))
            for i in range(n_layers):
                rules += self.layer_rules(f"backbone.{stack}.blocks.{i}", f"model.{stack}.layers.{i}",
                                          cross=stack == "decoder")
        return rules

    @staticmethod
    def layer_rules(ours: str, theirs: str, cross: bool) -> list[Rule]:
        pairs = [("attn_norm", "self_attn_layer_norm"), ("attn.out", "self_attn.out_proj"), ("mlp.fc", "fc1"),
                 ("mlp.proj", "fc2"), ("mlp_norm", "final_layer_norm")]
        if cross:
            pairs += [("cross_norm", "encoder_attn_layer_norm"), ("cross.q", "encoder_attn.q_proj"),
                      ("cross.out", "encoder_attn.out_proj")]
        rules = []
        for kind in ("weight", "bias"):
            rules += [same(f"{ours}.{o}.{kind}", f"{theirs}.{t}.{kind}") for o, t in pairs]
            rules.append(stacked(f"{ours}.attn.qkv.{kind}",
                                 tuple(f"{theirs}.self_attn.{p}_proj.{kind}" for p in "qkv")))
            if cross:
                rules.append(stacked(f"{ours}.cross.kv.{kind}", tuple(f"{theirs}.encoder_attn.{p}_proj.{kind}"
                                                                       for p in "kv")))
        return rules


BART = Bart()
