"""Hugging Face ``WhisperForConditionalGeneration`` <-> polytrain encoder-decoder whose encoder is an audio tower.

Whisper's encoder is polytrain's audio tower (``model.towers.audio``): two
1-D convolutions with GELU over the log-mel frames, the second of stride 2,
then a position table (sinusoids, stored), pre-norm blocks and a final norm;
its output is the decoder's memory as it is (no projector, no encoder stack of
the backbone's).  The decoder is pre-norm with learned positions, its token
table tied to the output (``proj_out``).  Every LayerNorm has eps 1e-5.

Whisper's key projections have no bias: polytrain's fused q/k/v (and k/v)
projections hold a zero one there, which export leaves out (a key bias moves
every score of a query alike; the softmax ignores it).  An audio token holds
two mel frames, so one token is one encoder position; a clip shorter than 30 s
takes the first rows of the position table, unpadded (transformers pads every
clip to 30 s).  The same checkpoint, its ``embedders.audio`` part taken, is an
audio tower under another LM (Qwen-Audio's shape).

The decoder starts from ``decoder_start_token_id`` (``<|startoftranscript|>``),
which becomes the run's ``bos``.
"""

from polytrain.config.model import BackboneConfig, EmbedConfig, ModelConfig
from polytrain.config.tower import TowerConfig
from polytrain.models.convert.family import (
    Architecture,
    HFFamily,
    expect,
    hf_activation_to_mlp,
    mlp_to_hf_activation,
)
from polytrain.models.convert.rules import NoPlace, Rule, same, stacked, tied, zero_filled
from polytrain.tokens import EmbedSpec

DEFAULTS = dict(vocab_size=51865, num_mel_bins=80, encoder_layers=4, encoder_attention_heads=6, decoder_layers=4,
                decoder_attention_heads=6, decoder_ffn_dim=1536, encoder_ffn_dim=1536, d_model=384,
                max_source_positions=1500, max_target_positions=448, activation_function="gelu",
                scale_embedding=False, tie_word_embeddings=True)
"""``WhisperConfig``'s defaults, for config files that leave keys out."""
FEATURES = dict(sampling_rate=16000, hop_length=160, n_fft=400, chunk_length=30)
"""``WhisperFeatureExtractor``'s defaults."""
NORM_EPS = 1e-5
"""Whisper's LayerNorms keep torch's default eps."""


def whisper_tower(c: dict, source: str) -> TowerConfig:
    """Whisper's encoder as an audio tower (its features the encoder's normalized output)."""
    return TowerConfig(stem="conv", dim=c["d_model"], layers=c["encoder_layers"], n_heads=c["encoder_attention_heads"],
                       mlp_width=c["encoder_ffn_dim"],
                       mlp=hf_activation_to_mlp(c["activation_function"], "activation_function", source),
                       norm_eps=NORM_EPS, cls_token=False, prefix_positions=False, positions=c["max_source_positions"],
                       final_norm=True, projector="none")


class Whisper(HFFamily):
    name, model_type, head = "WhisperForConditionalGeneration", "whisper", "encoder_decoder"
    base_prefix = "model."

    def architecture(self, config: dict) -> Architecture:
        c = {**DEFAULTS, **config}
        expect(c, "tie_word_embeddings", True, "ties the output to the token table", self.name)
        tower = whisper_tower(c, self.name)
        backbone = BackboneConfig(dim=c["d_model"], n_heads=c["decoder_attention_heads"], encoder_layers=0,
                                  decoder_layers=c["decoder_layers"], mlp_width=c["decoder_ffn_dim"], mlp=tower.mlp,
                                  norm_eps=NORM_EPS)
        embed = EmbedConfig(modality_vector=False, scale_tokens=c["scale_embedding"])
        model = ModelConfig(backbone=backbone, embed=embed, towers={"audio": tower})
        audio = EmbedSpec("audio", 2 * c["num_mel_bins"], (1, c["max_source_positions"]))
        return Architecture(model, EmbedSpec("text", c["vocab_size"], (1, c["max_target_positions"])), self.head,
                            others=(audio,))

    def tower(self, arch: Architecture) -> tuple[TowerConfig, EmbedSpec]:
        """The model's audio tower and spec; a model without one is not of Whisper's shape."""
        tower, audio = arch.model.towers.get("audio"), next((s for s in arch.others if s.modality == "audio"), None)
        if tower is None or audio is None or tower.stem != "conv" or arch.model.backbone.encoder_layers:
            raise NoPlace(f"{self.name} has no place for the model's encoder: it reads an audio tower with a conv "
                          "stem (model.towers.audio) as its encoder, and no encoder stack")
        return tower, audio

    def settings(self, arch: Architecture) -> dict:
        b, (tower, audio) = arch.model.backbone, self.tower(arch)
        return dict(vocab_size=arch.spec.input_dim, num_mel_bins=audio.input_dim // 2, d_model=b.dim,
                    encoder_layers=tower.built_layers, encoder_attention_heads=tower.n_heads,
                    encoder_ffn_dim=tower.mlp_hidden, decoder_layers=b.decoder_layers,
                    decoder_attention_heads=b.n_heads, decoder_ffn_dim=b.mlp_hidden,
                    max_source_positions=tower.positions or audio.grid[1], max_target_positions=arch.spec.grid[1],
                    activation_function=mlp_to_hf_activation(b.mlp, self.name),
                    scale_embedding=arch.model.embed.scale_tokens, tie_word_embeddings=True, is_encoder_decoder=True,
                    dropout=b.dropout, attention_dropout=b.dropout, activation_dropout=0.0,
                    begin_suppress_tokens=None, suppress_tokens=None, use_cache=True)

    def token_ids(self, config: dict, ids: dict[str, int]) -> dict:
        config = super().token_ids(config, ids)
        return {**config, "decoder_start_token_id": ids["bos"]} if "bos" in ids else config

    def special_roles(self, config: dict, special: dict[str, str], names: dict[int, str]) -> dict[str, str]:
        start = names.get(config.get("decoder_start_token_id"))
        return {**special, "bos": start} if start else special

    def preprocessing(self, config: dict, preprocessor: dict) -> dict:
        c, f = {**DEFAULTS, **config}, {**FEATURES, **preprocessor}
        rate, hop = f["sampling_rate"], f["hop_length"]
        longest = min(f["chunk_length"], c["max_source_positions"] * 2 * hop / rate)
        return {"audio": dict(frontend="whisper", sample_rate=rate, n_mels=f.get("feature_size", c["num_mel_bins"]),
                              frame_length_ms=1000 * f["n_fft"] / rate, frame_shift_ms=1000 * hop / rate,
                              patch_mels=f.get("feature_size", c["num_mel_bins"]), patch_frames=2,
                              max_seconds=longest)}

    def rules(self, arch: Architecture, task: str) -> list[Rule]:
        tower, b = self.tower(arch)[0], arch.model.backbone
        ours = "embedders.audio.tower"
        rules = [tied("embedders.text.table.weight", ("model.decoder.embed_tokens.weight", "proj_out.weight")),
                 same("embedders.text.position.weight", "model.decoder.embed_positions.weight"),
                 same(f"{ours}.stem.position.weight", "model.encoder.embed_positions.weight")]
        for kind in ("weight", "bias"):
            rules += [same(f"{ours}.stem.{conv}.{kind}", f"model.encoder.{conv}.{kind}") for conv in ("conv1", "conv2")]
            rules += [same(f"{ours}.norm.{kind}", f"model.encoder.layer_norm.{kind}"),
                      same(f"backbone.decoder.norm.{kind}", f"model.decoder.layer_norm.{kind}")]
        for i in range(tower.built_layers):
            rules += self.layer_rules(f"{ours}.blocks.{i}", f"model.encoder.layers.{i}", tower.dim, cross=False)
        for i in range(b.decoder_layers):
            rules += self.layer_rules(f"backbone.decoder.blocks.{i}", f"model.decoder.layers.{i}", b.dim, cross=True)
        return rules

    @staticmethod
    def layer_rules(ours: str, theirs: str, dim: int, cross: bool) -> list[Rule]:
        pairs = [("attn_norm", "self_attn_layer_norm"), ("attn.out", "self_attn.out_proj"), ("mlp.fc", "fc1"),
                 ("mlp.proj", "fc2"), ("mlp_norm", "final_layer_norm")]
        if cross:
            pairs += [("cross_norm", "encoder_attn_layer_norm"), ("cross.q", "encoder_attn.q_proj"),
                      ("cross.out", "encoder_attn.out_proj")]
        rules = [same(f"{ours}.{o}.{kind}", f"{theirs}.{t}.{kind}") for o, t in pairs for kind in ("weight", "bias")]
        attn = f"{theirs}.self_attn"
        rules += [stacked(f"{ours}.attn.qkv.weight", tuple(f"{attn}.{p}_proj.weight" for p in "qkv")),
                  zero_filled(f"{ours}.attn.qkv.bias", (f"{attn}.q_proj.bias", None, f"{attn}.v_proj.bias"), dim)]
        if cross:
            attn = f"{theirs}.encoder_attn"
            rules += [stacked(f"{ours}.cross.kv.weight", (f"{attn}.k_proj.weight", f"{attn}.v_proj.weight")),
                      zero_filled(f"{ours}.cross.kv.bias", (None, f"{attn}.v_proj.bias"), dim)]
        return rules


WHISPER = Whisper()
