"""Tokenizer throughput, side by side with the libraries they wrap, on the same inputs in one run.

- text: ``TextTokenizer.encode_batch`` vs the same HF tokenizer's ``encode_batch`` (and ``encode_batch_fast``,
  the call polytrain makes) on the standard library's source files, ids extracted on both sides;
- audio: ``AudioTokenizer.features`` vs ``torchaudio.compliance.kaldi.fbank`` called directly on the shipped
  spoken digits (and the Whisper front end vs torchaudio's MelSpectrogram with Whisper's log steps);
- image: ``ImageTokenizer`` from JPEG files (224 px, 16 px patches) in images/s, beside timm's eval
  transform (Pillow resize + crop + normalize) followed by the same patch cut; and the quick start's 8x8 digits.

Each pair runs item by item on both sides back to back, several rounds, keeping each item's fastest time per
side, so both sides see the same machine load and neither is charged for another process's bursts.
Ratios are throughput ratios, polytrain / reference: above 1 polytrain is faster.

    python bench/tokenizer_throughput.py [--rounds 3]

(Not ``bench/tokenizers.py``: a script folder is first on ``sys.path``, and that name would shadow the Hugging
Face library for every other benchmark.)

Last line: one JSON object with the figures.
"""

import sys
from pathlib import Path

# Run as a script, this file's folder comes first on the import path, and this file is named like the Hugging
# Face library it measures: drop the folder so that ``import tokenizers`` finds the library.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse  # noqa: E402
import json  # noqa: E402
import sysconfig  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np
import soundfile
import torch
import torchaudio
from PIL import Image

from polytrain.config.tokenizers import AudioTokenizerConfig, ImageTokenizerConfig, TextTokenizerConfig
from polytrain.tokenizers.audio import AudioTokenizer
from polytrain.tokenizers.image import ImageTokenizer, patchify
from polytrain.tokenizers.text import TextTokenizer

REPO = Path(__file__).resolve().parent.parent
SPOKEN_DIGITS = REPO / "polytrain" / "assets" / "spoken_digits"
TRAIN_FILES = 40
"""Standard-library files the BPE is trained on (all of them are encoded)."""
TEXT_BATCH = 16
"""Files per ``encode_batch`` call."""
JPEGS = 48
JPEG_SIZE = (500, 375)
"""Width, height of the synthetic photos: ImageNet's most common size."""


def side_by_side(items: list, rounds: int, *fns) -> list[float]:
    """Seconds of each of ``fns`` over all ``items``: each item is run by every function back to back (the order
    rotating), ``rounds`` times; an item's time on a side is its fastest round, which filters out the moments
    another process held the CPU."""
    best = [[float("inf")] * len(items) for _ in fns]
    for n in range(rounds + 1):  # round 0 warms up
        for i, item in enumerate(items):
            shift = (n + i) % len(fns)
            for side in [*range(shift, len(fns)), *range(shift)]:
                began = time.perf_counter()
                fns[side](item)
                if n:
                    best[side][i] = min(best[side][i], time.perf_counter() - began)
    return [sum(times) for times in best]


def bench_text(rounds: int) -> dict:
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    texts = [f.read_text(encoding="utf-8", errors="replace") for f in files]
    tok = TextTokenizer.train(texts[:TRAIN_FILES], TextTokenizerConfig(vocab_size=4096))
    hf = tok.hf  # the very same tokenizer object, settings included
    n_tokens = sum(len(ids) for ids in tok.encode_batch(texts))
    batches = [texts[i: i + TEXT_BATCH] for i in range(0, len(texts), TEXT_BATCH)]
    ours, raw, fast = side_by_side(batches, rounds, tok.encode_batch,
                                   lambda b: [e.ids for e in hf.encode_batch(b, add_special_tokens=False)],
                                   lambda b: [e.ids for e in hf.encode_batch_fast(b, add_special_tokens=False)])
    mb = sum(len(t.encode()) for t in texts) / 1e6
    print(f"text   {len(texts)} files, {mb:.1f} MB, {n_tokens} tokens")
    print(f"       polytrain encode_batch {n_tokens / ours / 1e6:6.2f} M tok/s | HF encode_batch "
          f"{n_tokens / raw / 1e6:6.2f} M tok/s | ratio {raw / ours:.3f}")
    print(f"       polytrain encode_batch {n_tokens / ours / 1e6:6.2f} M tok/s | HF encode_batch_fast "
          f"{n_tokens / fast / 1e6:6.2f} M tok/s | ratio {fast / ours:.3f}")
    return {"text_ratio_vs_encode_batch": raw / ours, "text_ratio_vs_encode_batch_fast": fast / ours,
            "text_mtokens_per_s": n_tokens / ours / 1e6}


def bench_audio(rounds: int) -> dict:
    waves = [torch.from_numpy(soundfile.read(p, dtype="float32")[0]) for p in sorted(SPOKEN_DIGITS.glob("*.wav"))]
    seconds = sum(len(w) for w in waves) / 16_000
    kaldi = AudioTokenizer(AudioTokenizerConfig(n_mels=64))
    ours, raw = side_by_side(
        waves, rounds, kaldi.features,
        lambda w: torchaudio.compliance.kaldi.fbank(w[None], sample_frequency=16_000, num_mel_bins=64,
                                                    frame_length=25.0, frame_shift=10.0, window_type="hanning",
                                                    dither=0.0, htk_compat=True, use_energy=False))
    whisper = AudioTokenizer(AudioTokenizerConfig(frontend="whisper", n_mels=80))
    mel = torchaudio.transforms.MelSpectrogram(16_000, n_fft=400, hop_length=160, n_mels=80, norm="slaney",
                                               mel_scale="slaney")

    def whisper_direct(w):
        log_mel = mel(w)[:, :-1].clamp(min=1e-10).log10()
        return ((torch.maximum(log_mel, log_mel.max() - 8.0) + 4.0) / 4.0).T

    ours_w, raw_w = side_by_side(waves, rounds, whisper.features, whisper_direct)
    clips = sorted(SPOKEN_DIGITS.glob("*.wav"))
    files_per_s = len(clips) / side_by_side(clips, rounds, kaldi)[0]
    print(f"audio  {len(waves)} clips, {seconds:.0f} s of speech")
    print(f"       kaldi fbank: polytrain {seconds / ours:7.0f}x real time | torchaudio direct "
          f"{seconds / raw:7.0f}x | ratio {raw / ours:.3f}")
    print(f"       whisper log-mel: polytrain {seconds / ours_w:7.0f}x real time | torchaudio direct "
          f"{seconds / raw_w:7.0f}x | ratio {raw_w / ours_w:.3f}")
    print(f"       whole tokenizer from WAV files (read, fbank, patches): {files_per_s:.0f} clips/s")
    return {"audio_fbank_ratio": raw / ours, "audio_whisper_ratio": raw_w / ours_w,
            "audio_clips_per_s_from_files": files_per_s}


def bench_image(rounds: int, folder: Path) -> dict:
    from timm.data import create_transform

    rng = np.random.default_rng(0)
    paths = []
    for i in range(JPEGS):  # smooth random photos: low-frequency noise upsampled, like natural images compress
        small = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
        path = folder / f"{i}.jpg"
        Image.fromarray(small).resize(JPEG_SIZE, Image.BICUBIC).save(path, quality=90)
        paths.append(path)
    tok = ImageTokenizer(ImageTokenizerConfig(size=224, patch_size=16, norm="imagenet"))
    timm_eval = create_transform(224, interpolation="bilinear", crop_pct=1.0)  # timm's eval transform, PIL based

    ours, ref = side_by_side(paths, rounds, tok, lambda p: patchify(timm_eval(Image.open(p).convert("RGB")), 16))
    digits = []
    for i in range(200):
        path = folder / f"digit{i}.png"
        Image.fromarray(rng.integers(0, 17, (8, 8), dtype=np.uint8) * 15).save(path)
        digits.append(path)
    small = ImageTokenizer(ImageTokenizerConfig(size=8, patch_size=4, channels=1))
    digits_per_s = len(digits) / side_by_side(digits, rounds, small)[0]
    print(f"image  {len(paths)} JPEGs of {JPEG_SIZE[0]}x{JPEG_SIZE[1]} -> 196 patches of 16x16x3")
    print(f"       polytrain {len(paths) / ours:6.0f} images/s | timm eval transform + same patch cut "
          f"{len(paths) / ref:6.0f} images/s | ratio {ref / ours:.3f}")
    print(f"       quick-start digits (8x8 PNG -> 4 patches): {digits_per_s:.0f} images/s")
    return {"image_224_images_per_s": len(paths) / ours, "image_224_ratio_vs_timm_transform": ref / ours,
            "image_digits_images_per_s": digits_per_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per item and side")
    args = parser.parse_args()
    print(f"torch threads {torch.get_num_threads()}, python {sys.version.split()[0]}")
    figures = {**bench_text(args.rounds), **bench_audio(args.rounds)}
    with tempfile.TemporaryDirectory() as tmp:
        figures.update(bench_image(args.rounds, Path(tmp)))
    print(json.dumps({k: round(v, 3) for k, v in figures.items()}))


if __name__ == "__main__":
    main()
