"""Hugging Face ``BertForMaskedLM`` and ``BertForSequenceClassification`` <-> polytrain encoder-only.

Post-norm, GELU, learned positions, a token-type table (polytrain's text
segments are single sentences, so every token adds type 0, as BERT does when
given no ``token_type_ids``) and a LayerNorm over the summed embeddings.  The
masked-LM head is a dense + GELU + LayerNorm transform, the tied vocabulary
map and an output bias; the classifier takes the [CLS] (first) token through
BERT's dense + tanh pooler.  Files of BERT's pretraining model also hold the
pooler and the next-sentence head, which the masked-LM class does not use
either.
"""

from abc import abstractmethod
from dataclasses import replace

from polytrain.config.model import BackboneConfig, ClassifierConfig, EmbedConfig, HeadsConfig, ModelConfig
from polytrain.models.convert.family import (
    Architecture,
    HFFamily,
    expect,
    hf_activation_to_mlp,
    mlp_to_hf_activation,
)
from polytrain.models.convert.rules import Rule, same, stacked, tied
from polytrain.tokens import EmbedSpec

DEFAULTS = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                hidden_act="gelu", max_position_embeddings=512, type_vocab_size=2, layer_norm_eps=1e-12,
                tie_word_embeddings=True)
"""``BertConfig``'s defaults, for config files that leave keys out."""


class Bert(HFFamily):
    """The encoder both BERT classes share; subclasses add their head."""

    model_type = "bert"  # not a registry name: "bert" alone does not say which head
    base_prefix = "bert."
    unused = r"\.position_ids$"  # a buffer files of older transformers saved

    def architecture(self, config: dict) -> Architecture:
        c = {**DEFAULTS, **config}
        expect(c, "position_embedding_type", "absolute", "has learned absolute positions only", self.name)
        expect(c, "is_decoder", False, "reads BERT as an encoder", self.name)
        expect(c, "add_cross_attention", False, "reads BERT as an encoder", self.name)
        backbone = BackboneConfig(dim=c["hidden_size"], n_heads=c["num_attention_heads"],
                                  encoder_layers=c["num_hidden_layers"], decoder_layers=0,
                                  mlp_width=c["intermediate_size"], norm_eps=c["layer_norm_eps"],
                                  norm_position="post", embed_norm=True,
                                  mlp=hf_activation_to_mlp(c["hidden_act"], "hidden_act", self.name))
        embed = EmbedConfig(modality_vector=False, token_types=c["type_vocab_size"])
        model = ModelConfig(backbone=backbone, embed=embed, tie_embeddings=c["tie_word_embeddings"])
        spec = EmbedSpec("text", c["vocab_size"], (1, c["max_position_embeddings"]))
        return self.with_head(Architecture(model, spec, ""), c)

    @abstractmethod
    def with_head(self, arch: Architecture, c: dict) -> Architecture:
        """``arch`` (the encoder) with this class's head, configured from ``c``."""

    def settings(self, arch: Architecture) -> dict:
        b = arch.model.backbone
        return dict(vocab_size=arch.spec.input_dim, max_position_embeddings=arch.spec.grid[1], hidden_size=b.dim,
                    num_hidden_layers=b.encoder_layers, num_attention_heads=b.n_heads, intermediate_size=b.mlp_hidden,
                    hidden_act=mlp_to_hf_activation(b.mlp, self.name), layer_norm_eps=b.norm_eps,
                    type_vocab_size=arch.model.embed.token_types, tie_word_embeddings=arch.model.tie_embeddings,
                    hidden_dropout_prob=b.dropout, attention_probs_dropout_prob=b.dropout)

    def rules(self, arch: Architecture, task: str) -> list[Rule]:
        rules = [same("embedders.text.position.weight", "bert.embeddings.position_embeddings.weight"),
                 same("embedders.text.token_type.weight", "bert.embeddings.token_type_embeddings.weight")]
        for kind in ("weight", "bias"):
            rules.append(same(f"backbone.encoder.input_norm.{kind}", f"bert.embeddings.LayerNorm.{kind}"))
        pairs = [("attn.out", "attention.output.dense"), ("attn_norm", "attention.output.LayerNorm"),
                 ("mlp.fc", "intermediate.dense"), ("mlp.proj", "output.dense"), ("mlp_norm", "output.LayerNorm")]
        for i in range(arch.model.backbone.encoder_layers):
            ours, theirs = f"backbone.encoder.blocks.{i}", f"bert.encoder.layer.{i}"
            for kind in ("weight", "bias"):
                rules += [same(f"{ours}.{o}.{kind}", f"{theirs}.{t}.{kind}") for o, t in pairs]
                rules.append(stacked(f"{ours}.attn.qkv.{kind}", tuple(f"{theirs}.attention.self.{p}.{kind}"
                                                                       for p in ("query", "key", "value"))))
        return rules


class BertMaskedLM(Bert):
    name, head = "BertForMaskedLM", "masked_lm"
    unused = rf"{Bert.unused}|^(bert\.pooler|cls\.seq_relationship)\."

    def with_head(self, arch: Architecture, c: dict) -> Architecture:
        expect(c, "hidden_act", "gelu", "has an erf-GELU masked-LM transform", self.name)
        return replace(arch, model=replace(arch.model, lm_bias=True), head=self.head)

    def rules(self, arch: Architecture, task: str) -> list[Rule]:
        table, head = "embedders.text.table.weight", f"heads.{task}"
        if arch.model.tie_embeddings:
            output = [tied(table, ("bert.embeddings.word_embeddings.weight", "cls.predictions.decoder.weight")),
                      tied("embedders.text.output_bias", ("cls.predictions.bias", "cls.predictions.decoder.bias"))]
        else:
            # untied, transformers 5 leaves cls.predictions.bias unused beside the decoder's own bias (4 shared
            # one tensor), so the decoder's is read and both are written
            bias = Rule("lm_head.bias", ("cls.predictions.decoder.bias", "cls.predictions.bias"), lambda t: t[0],
                        lambda t: [t, t])
            output = [same(table, "bert.embeddings.word_embeddings.weight"),
                      same("lm_head.weight", "cls.predictions.decoder.weight"), bias]
        transform = [same(f"{head}.{o}.{kind}", f"cls.predictions.transform.{t}.{kind}")
                     for o, t in (("dense", "dense"), ("norm", "LayerNorm")) for kind in ("weight", "bias")]
        return super().rules(arch, task) + output + transform


class BertSequenceClassification(Bert):
    name, head = "BertForSequenceClassification", "encoder_classifier"

    def with_head(self, arch: Architecture, c: dict) -> Architecture:
        expect(c, "problem_type", "single_label_classification", "trains classifiers on one label per sample",
               self.name)
        classes = c.get("num_labels") or len(c.get("id2label") or {}) or 2
        heads = HeadsConfig(classifier=ClassifierConfig(classes=classes, pooling="cls", pooler=True))
        # a classifier has no vocabulary output, so no lm_head either
        return replace(arch, model=replace(arch.model, heads=heads, tie_embeddings=True), head=self.head)

    def settings(self, arch: Architecture) -> dict:
        classes = arch.model.heads.classifier.classes
        return {**super().settings(arch), "id2label": {str(i): f"LABEL_{i}" for i in range(classes)},
                "label2id": {f"LABEL_{i}": i for i in range(classes)}}

    def rules(self, arch: Architecture, task: str) -> list[Rule]:
        head = [same(f"heads.{task}.{o}.{kind}", f"{t}.{kind}")
                for o, t in (("pooler", "bert.pooler.dense"), ("proj", "classifier")) for kind in ("weight", "bias")]
        table = same("embedders.text.table.weight", "bert.embeddings.word_embeddings.weight")
        return [*super().rules(arch, task), table, *head]


BERT_MASKED_LM, BERT_CLASSIFIER = BertMaskedLM(), BertSequenceClassification()
