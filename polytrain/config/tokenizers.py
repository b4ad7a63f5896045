"""The tokenizers' config sections, and the modality registry, known without importing torch.

``TokenizersConfig`` (``tokenizers``) holds one section per built-in modality
(``text``, ``image``, ``audio``) and the sections of plugin tokenizers
(``tokenizers.plugins.<name>``).  ``TOKENIZERS`` names the tokenizer class of
each modality; the built-in ones are imported when first looked up.
"""

import math
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from polytrain.config.registries import NORMALIZATIONS, TOKENIZERS
from polytrain.errors import ConfigError
from polytrain.schema import NonNegative, Positive, Range, from_dict

BUILT_IN = ("text", "image", "audio")

PluginValue = str | int | float | bool
OverflowPolicy = Literal["truncate", "error"]
"""What a tokenizer does with a sample longer than its limit: cut it (counted, logged) or refuse it."""

PAD, BOS, EOS, UNK, MASK = "<pad>", "<bos>", "<eos>", "<unk>", "<mask>"


def markers(modality: str) -> tuple[str, str]:
    """The tokens that open and close a span of ``modality`` inside a text sequence: ``<image>``, ``</image>``."""
    return f"<{modality}>", f"</{modality}>"


SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, MASK, *markers("image"), *markers("audio"))
"""Ids 0.. in this order in a tokenizer polytrain trains; ``<pad>`` is 0. The markers of a plugin modality a
run uses follow them."""
N_BYTES = 256


@dataclass(frozen=True)
class TextTokenizerConfig:
    vocab_size: int = 4096
    """Tokens in the trained vocabulary, special tokens and the 256 byte tokens included."""
    max_len: Annotated[int, Range(ge=4)] = 256
    """Longest token sequence a model sees for one text segment; sizes the text position table."""
    path: str | None = None
    """An existing ``tokenizer.json`` to load; when null, polytrain trains one on the run's text."""
    min_frequency: NonNegative[int] = 2
    """A pair must occur this often in the training text to be merged."""
    overflow: OverflowPolicy = "truncate"
    """A text segment longer than ``max_len`` (or a target longer than its task's ``max_target_len``):
    ``truncate`` keeps its first tokens (counted, the first and every 1000th logged); ``error`` refuses the
    sample."""
    pad_to_multiple: Annotated[int, Range(ge=1, note="1: no rounding")] = 1
    """``TextTokenizer.batch`` pads every batch to a length that is a multiple of this (8 suits tensor cores)."""
    pad: str = PAD
    """The token that pads batches. A loaded ``tokenizer.json`` that lacks it gets it as a new id."""
    bos: str = BOS
    """The token that starts a target sequence; for a GPT-2 ``tokenizer.json`` name ``<|endoftext|>``."""
    eos: str = EOS
    """The token that ends a sequence and separates packed documents; GPT-2: ``<|endoftext|>``."""
    mask: str = MASK
    """The token masked_lm puts in place of the tokens to predict; BERT's ``tokenizer.json``: ``[MASK]``."""
    span_markers: bool = True
    """A non-text span inside text is laid out between its modality's markers (``<image>``, one slot per token,
    ``</image>``); false: as its slots alone, each holding the modality's token (``<image>``), as LLaVA's
    ``input_ids`` hold one image token per image feature (what ``export --format hf`` needs to write a run as
    LlavaForConditionalGeneration). A prompt must then end in text."""

    def check(self) -> None:
        floor = N_BYTES + len(SPECIAL_TOKENS)
        if self.vocab_size <= floor:
            raise ConfigError("vocab_size", self.vocab_size, f"must exceed {floor} (256 bytes + special tokens)")
        for key in ("pad", "bos", "eos", "mask"):
            if not getattr(self, key):
                raise ConfigError(key, getattr(self, key), "must name a token")
        if self.pad in (self.bos, self.eos):
            raise ConfigError("pad", self.pad, "must differ from bos and eos: padding is dropped from the loss")

    def special_tokens(self, modalities: tuple[str, ...] = ()) -> list[str]:
        """The special tokens of a tokenizer polytrain trains, in id order: the built-in ones, then the markers of
        the plugin ``modalities``."""
        names = [self.pad, self.bos, self.eos, UNK, self.mask, *SPECIAL_TOKENS[5:],
                 *(marker for modality in modalities if modality not in BUILT_IN for marker in markers(modality))]
        return list(dict.fromkeys(names))

    def required_tokens(self, modalities: tuple[str, ...] = (), masked: bool = False) -> list[str]:
        """The special tokens a run uses, which a loaded tokenizer (a checkpoint's) gets where it lacks them: pad,
        bos, eos; the mask for masked_lm; the markers (or slot token) of the ``modalities`` laid out in text."""
        spans = [marker for modality in modalities for marker in markers(modality)[: 2 if self.span_markers else 1]]
        return list(dict.fromkeys([self.pad, self.bos, self.eos, *([self.mask] if masked else []), *spans]))


Triple = tuple[float, float, float]


IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
INCEPTION = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
OPENAI_CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
DPN = ((124 / 255, 117 / 255, 104 / 255), (1 / (0.0167 * 255),) * 3)
"""The (mean, std) presets ``config.registries.NORMALIZATIONS`` names: timm's (``timm.data.constants``)."""


@dataclass(frozen=True)
class ImageTokenizerConfig:
    size: Positive[int] = 224
    """crop/pad: side of the square output, in pixels. fit: the longest side an image may get."""
    patch_size: Positive[int] = 16
    """Side of one square patch, in pixels; must divide ``size``."""
    channels: int = 3
    """3 reads images as RGB, 1 as grayscale."""
    resize: Literal["crop", "pad", "fit", "stretch"] = "crop"
    """crop: shorter side to ``size`` / ``crop_pct``, then the center ``size`` square (torchvision Resize +
    CenterCrop, timm's eval transform, CLIP's processor). pad: longer side to ``size``, centered on a square whose
    border is the mean color. fit: keep the aspect ratio and the native resolution, scaled down only as far as
    ``max_patches`` and ``size`` require, each side rounded to whole patches: a variable patch grid per image.
    stretch: both sides to ``size``, the aspect ratio not kept (SigLIP's processor)."""
    interpolation: Literal["bilinear", "bicubic"] = "bilinear"
    """How images are resized (antialiased either way); CLIP, SigLIP and timm's pretrained ViTs: bicubic."""
    crop_pct: Annotated[float, Range(gt=0, le=1)] = 1.0
    """crop: the share of the resized shorter side the center crop keeps (timm's ``crop_pct``; 0.875 resizes a
    224 crop's shorter side to 256)."""
    max_patches: Annotated[int, Range(ge=0, note="0: (size / patch_size)^2")] = 0
    """fit: the token budget, the most patches one image may give (0: (size / patch_size)^2)."""
    mean: Triple = (0.5, 0.5, 0.5)
    """Per-channel mean subtracted after scaling pixels to [0, 1] (first entry used when channels=1)."""
    std: tuple[Positive[float], Positive[float], Positive[float]] = (0.5, 0.5, 0.5)
    """Per-channel std divided by after subtracting the mean."""
    norm: str | None = None
    """A named (mean, std) preset instead of ``mean``/``std``: imagenet, inception, openai_clip, dpn (timm's)."""
    min_side: Annotated[int, Range(ge=0, note="0: patch_size")] = 0
    """Images with a side shorter than this many pixels are refused (0: one patch, ``patch_size``)."""
    max_aspect: Annotated[float, Range(ge=1)] = 20.0
    """Images whose long side exceeds this many short sides are refused: a center crop would drop most of
    the image, padding or fitting would squeeze the short side into a sliver."""

    def check(self) -> None:
        if self.size % self.patch_size:
            raise ConfigError("patch_size", self.patch_size, f"must be positive and divide size={self.size}")
        if self.channels not in (1, 3):
            raise ConfigError("channels", self.channels, "must be 1 (grayscale) or 3 (RGB)")
        if self.norm is not None:
            if self.norm not in NORMALIZATIONS:
                raise ConfigError("norm", self.norm, f"unknown preset; known: {', '.join(NORMALIZATIONS.names())}")
            if (self.mean, self.std) != (ImageTokenizerConfig.mean, ImageTokenizerConfig.std):
                raise ConfigError("norm", self.norm, "set either norm or mean/std, not both")

    @property
    def grid(self) -> int:
        """Patches per side of a crop/pad image; the most per side of a fit image."""
        return self.size // self.patch_size

    @property
    def budget(self) -> int:
        """The most patches one image gives."""
        return self.max_patches if self.resize == "fit" and self.max_patches else self.grid**2

    @property
    def normalization(self) -> tuple[Triple, Triple]:
        return NORMALIZATIONS.get(self.norm) if self.norm else (self.mean, self.std)


def kaldi_frames(samples: int, window: int, hop: int) -> int:
    """Frames of a clip of ``samples``: whole windows only (Kaldi's snip_edges)."""
    return 0 if samples < window else 1 + (samples - window) // hop


def whisper_frames(samples: int, hop: int) -> int:
    """Frames of a clip of ``samples`` under Whisper's centered STFT, its last frame dropped."""
    return samples // hop


@dataclass(frozen=True)
class AudioTokenizerConfig:
    sample_rate: Positive[int] = 16_000
    """Rate every clip is resampled to, in Hz."""
    frontend: Literal["kaldi", "whisper"] = "kaldi"
    """kaldi: Kaldi-compatible log-mel fbank (AST), then (x - mean) / std. whisper: Whisper's log-mel (log10,
    8-decade range below the clip's peak, (x + 4) / 4); use n_mels 80 or 128 to match Whisper's."""
    n_mels: Positive[int] = 80
    """Mel filterbank bins per frame."""
    frame_length_ms: Positive[float] = 25.0
    """Analysis window, in ms (400 samples at 16 kHz; Whisper's n_fft)."""
    frame_shift_ms: Positive[float] = 10.0
    """Hop between frames, in ms (160 samples at 16 kHz: 100 frames per second)."""
    patch_mels: Positive[int] = 16
    """Mel bins per patch."""
    patch_frames: Positive[int] = 16
    """Frames per patch (160 ms at a 10 ms hop)."""
    stride_mels: NonNegative[int] = 0
    """Mel bins between the starts of vertically adjacent patches (0: patch_mels, no overlap); patches must tile
    the bins exactly: (n_mels - patch_mels) divisible by it."""
    stride_frames: NonNegative[int] = 0
    """Frames between the starts of horizontally adjacent patches (0: patch_frames, no overlap)."""
    max_seconds: Positive[float] = 10.0
    """Longest clip, in seconds; it sizes the time position table. Longer clips follow ``overflow``."""
    overflow: OverflowPolicy = "truncate"
    """A clip longer than ``max_seconds``: truncate keeps its start (counted, the first and every 1000th
    logged); error refuses it."""
    mean: float = -4.27
    """kaldi: log-mel value subtracted before scaling (AST's AudioSet statistic)."""
    std: Positive[float] = 4.57
    """kaldi: log-mel scale divided by after subtracting ``mean``."""
    freq_mask: NonNegative[int] = 0
    """SpecAugment, only when the caller asks (``augment=True``, training): widest frequency mask, in mel bins
    (0: none; AST uses 48 of 128)."""
    time_mask: NonNegative[int] = 0
    """SpecAugment: widest time mask, in frames (0: none; AST uses 192 of 1024)."""
    masks: NonNegative[int] = 1
    """SpecAugment: masks of each kind per clip."""

    def check(self) -> None:
        if self.stride_mels == 0 and self.n_mels % self.patch_mels:
            raise ConfigError("patch_mels", self.patch_mels, f"must be positive and divide n_mels={self.n_mels}")
        if self.patch_mels > self.n_mels:
            raise ConfigError("patch_mels", self.patch_mels, f"must be in 1..n_mels={self.n_mels}")
        if self.stride_mels > self.patch_mels or (self.n_mels - self.patch_mels) % self.mel_stride:
            raise ConfigError("stride_mels", self.stride_mels,
                              f"must be in 1..patch_mels={self.patch_mels} and divide n_mels - patch_mels = "
                              f"{self.n_mels - self.patch_mels}, so patches cover every mel bin")
        if self.stride_frames > self.patch_frames:
            raise ConfigError("stride_frames", self.stride_frames, f"must be in 0..patch_frames={self.patch_frames}")
        if self.frame_length_ms < self.frame_shift_ms:
            raise ConfigError("frame_shift_ms", self.frame_shift_ms,
                              f"must be > 0 and <= frame_length_ms={self.frame_length_ms}")
        if self.hop < 1:
            raise ConfigError("frame_shift_ms", self.frame_shift_ms, f"must be at least one sample: "
                              f">= {1000 / self.sample_rate:g} ms at sample_rate={self.sample_rate}")
        if self.max_seconds * self.sample_rate < self.min_samples:
            raise ConfigError("max_seconds", self.max_seconds, f"must hold one patch: {self.min_samples} samples at "
                              f"sample_rate={self.sample_rate} (patch_frames={self.patch_frames} frames of "
                              f"frame_length_ms={self.frame_length_ms:g}, frame_shift_ms={self.frame_shift_ms:g})")

    @property
    def window(self) -> int:
        """Samples per analysis window (Whisper's n_fft)."""
        return int(self.sample_rate * self.frame_length_ms / 1000)

    @property
    def hop(self) -> int:
        """Samples between frame starts."""
        return int(self.sample_rate * self.frame_shift_ms / 1000)

    @property
    def frames_per_second(self) -> float:
        return self.sample_rate / self.hop

    @property
    def mel_stride(self) -> int:
        return self.stride_mels or self.patch_mels

    @property
    def frame_stride(self) -> int:
        return self.stride_frames or self.patch_frames

    @property
    def max_samples(self) -> int:
        return int(self.max_seconds * self.sample_rate)

    @property
    def min_samples(self) -> int:
        """The shortest clip that gives one whole patch of frames."""
        if self.frontend == "kaldi":
            return self.window + (self.patch_frames - 1) * self.hop
        return max(self.patch_frames * self.hop, self.window // 2 + 1)  # reflect padding needs S > n_fft // 2

    def frames(self, samples: int) -> int:
        """Frames a clip of ``samples`` gives."""
        if self.frontend == "kaldi":
            return kaldi_frames(samples, self.window, self.hop)
        return whisper_frames(samples, self.hop)

    @property
    def grid(self) -> tuple[int, int]:
        """(mel patch rows, time patch columns) of the longest clip."""
        return patch_grid(self.frames(self.max_samples), self.n_mels, self.patch_mels, self.patch_frames,
                          self.mel_stride, self.frame_stride)


def patch_grid(frames: int, mels: int, patch_mels: int, patch_frames: int, stride_mels: int,
               stride_frames: int) -> tuple[int, int]:
    """(R, K): mel rows that tile ``mels`` exactly; time columns covering ``frames``, the last one padded."""
    return (mels - patch_mels) // stride_mels + 1, max(1, math.ceil((frames - patch_frames) / stride_frames) + 1)


@dataclass(frozen=True)
class TokenizersConfig:
    """One section per modality."""

    text: TextTokenizerConfig = field(default_factory=TextTokenizerConfig)
    image: ImageTokenizerConfig = field(default_factory=ImageTokenizerConfig)
    audio: AudioTokenizerConfig = field(default_factory=AudioTokenizerConfig)
    plugins: dict[str, dict[str, PluginValue]] = field(default_factory=dict)
    """Config of plugin tokenizers by modality name: keys of that tokenizer's ``config_class``."""

    def check(self) -> None:
        for name in self.plugins:
            if name in BUILT_IN:
                raise ConfigError(f"plugins.{name}", self.plugins[name], f"{name} is built in; configure it under "
                                                                         f"tokenizers.{name}")
            if name not in TOKENIZERS:
                raise ConfigError(f"plugins.{name}", self.plugins[name],
                                  f"no tokenizer of that name is installed; known: {', '.join(TOKENIZERS.names())}")
            self.section(name)

    def section(self, modality: str) -> Any:
        """The config object of ``modality``'s tokenizer."""
        if modality in BUILT_IN:
            return getattr(self, modality)
        return from_dict(TOKENIZERS.get(modality).config_class, self.plugins.get(modality, {}), f"plugins.{modality}")

