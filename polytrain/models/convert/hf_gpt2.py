"""Hugging Face ``GPT2LMHeadModel`` <-> polytrain decoder-only: pre-norm, tanh-GELU, learned positions.

GPT-2's Conv1D layers keep their weights (in, out), so every projection is
transposed; the output projection is the token table unless
``tie_word_embeddings`` is false.  The Hub's own GPT-2 files are base-model
files (no ``transformer.`` prefix) with the causal-mask buffers saved.
"""

from polytrain.config.model import BackboneConfig, EmbedConfig, ModelConfig
from polytrain.models.convert.family import (
    Architecture,
    HFFamily,
    expect,
    hf_activation_to_mlp,
    mlp_to_hf_activation,
)
from polytrain.models.convert.rules import Rule, same, tied, transposed
from polytrain.tokens import EmbedSpec

DEFAULTS = dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12, n_inner=None,
                activation_function="gelu_new", layer_norm_epsilon=1e-5, tie_word_embeddings=True)
"""``GPT2Config``'s defaults, for config files that leave keys out."""


class GPT2(HFFamily):
    name, model_type, head = "GPT2LMHeadModel", "gpt2", "decoder_only"
    base_prefix = "transformer."
    unused = r"\.attn\.(masked_)?bias$"  # the causal mask, a buffer older files saved

    def architecture(self, config: dict) -> Architecture:
        c = {**DEFAULTS, **config}
        expect(c, "scale_attn_weights", True, "always scales scores by 1/sqrt(head dim)", self.name)
        expect(c, "scale_attn_by_inverse_layer_idx", False, "does not scale scores by layer", self.name)
        expect(c, "add_cross_attention", False, "reads GPT-2 as a decoder-only model", self.name)
        dim = c["n_embd"]
        backbone = BackboneConfig(dim=dim, n_heads=c["n_head"], encoder_layers=0, decoder_layers=c["n_layer"],
                                  mlp_width=c["n_inner"] or 4 * dim, norm_eps=c["layer_norm_epsilon"],
                                  mlp=hf_activation_to_mlp(c["activation_function"], "activation_function", self.name))
        model = ModelConfig(backbone=backbone, embed=EmbedConfig(modality_vector=False),
                            tie_embeddings=c["tie_word_embeddings"])
        return Architecture(model, EmbedSpec("text", c["vocab_size"], (1, c["n_positions"])), self.head)

    def settings(self, arch: Architecture) -> dict:
        b = arch.model.backbone
        return dict(vocab_size=arch.spec.input_dim, n_positions=arch.spec.grid[1], n_embd=b.dim,
                    n_layer=b.decoder_layers, n_head=b.n_heads, n_inner=b.mlp_hidden,
                    activation_function=mlp_to_hf_activation(b.mlp, self.name), layer_norm_epsilon=b.norm_eps,
                    tie_word_embeddings=arch.model.tie_embeddings, resid_pdrop=b.dropout, embd_pdrop=b.dropout,
                    attn_pdrop=b.dropout)

    def rules(self, arch: Architecture, task: str) -> list[Rule]:
        if arch.model.tie_embeddings:
            rules = [tied("embedders.text.table.weight", ("transformer.wte.weight", "lm_head.weight"))]
        else:
            rules = [same("embedders.text.table.weight", "transformer.wte.weight"),
                     same("lm_head.weight", "lm_head.weight")]
        rules += [same("embedders.text.position.weight", "transformer.wpe.weight"),
                  same("backbone.decoder.norm.weight", "transformer.ln_f.weight"),
                  same("backbone.decoder.norm.bias", "transformer.ln_f.bias")]
        for i in range(arch.model.backbone.decoder_layers):
            ours, theirs = f"backbone.decoder.blocks.{i}", f"transformer.h.{i}"
            for kind in ("weight", "bias"):
                rules += [same(f"{ours}.attn_norm.{kind}", f"{theirs}.ln_1.{kind}"),
                          same(f"{ours}.mlp_norm.{kind}", f"{theirs}.ln_2.{kind}")]
            for our_name, their_name in (("attn.qkv", "attn.c_attn"), ("attn.out", "attn.c_proj"),
                                         ("mlp.fc", "mlp.c_fc"), ("mlp.proj", "mlp.c_proj")):
                rules += [transposed(f"{ours}.{our_name}.weight", f"{theirs}.{their_name}.weight"),
                          same(f"{ours}.{our_name}.bias", f"{theirs}.{their_name}.bias")]
        return rules


GPT2_LM_HEAD = GPT2()
