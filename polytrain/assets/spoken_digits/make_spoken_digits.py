"""Synthesize the shipped spoken-digit clips with espeak-ng (run once; output is committed).

Each "speaker" is one espeak-ng setting: an English accent, a voice variant,
a speaking rate and a pitch, drawn from a fixed seed.  Every speaker says all
ten digit words, so a split by speaker holds out voices the model never heard.

    apt-get install espeak-ng
    python polytrain/assets/spoken_digits/make_spoken_digits.py

Writes ``<speaker>_<digit>.wav`` (16 kHz, mono, 16-bit PCM, leading/trailing
silence trimmed) and ``speakers.json`` describing each speaker.
"""

import io
import json
import random
import subprocess
from pathlib import Path

import numpy as np
import soundfile
import torch
import torchaudio

OUT_DIR = Path(__file__).resolve().parent
SEED = 20261121
N_SPEAKERS = 30
SAMPLE_RATE = 16_000
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
ACCENTS = ["en-gb", "en-us", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-gb-x-gbclan",
           "en-gb-x-gbcwmd", "en-us-nyc"]
VARIANTS = ["m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5", "croak",
            "klatt", "klatt2", "klatt3", "whisperf", "Andy", "Annie", "Denis", "Gene", "Jacky",
            "Lee", "Mario", "Michael", "Tweaky", "aunty", "boris", "david", "grandma", "john"]
RATE_WPM = (110, 230)
PITCH = (15, 85)
SILENCE_DB = -40.0  # frames quieter than this (relative to the clip's peak) count as silence
PAD_SECONDS = 0.03  # silence kept on each side after trimming


def speakers(n: int) -> list[dict]:
    rng = random.Random(SEED)
    return [{"speaker": f"s{i:02d}", "voice": f"{rng.choice(ACCENTS)}+{rng.choice(VARIANTS)}",
             "rate": rng.randint(*RATE_WPM), "pitch": rng.randint(*PITCH)} for i in range(n)]


def synthesize(word: str, voice: str, rate: int, pitch: int) -> np.ndarray:
    wav = subprocess.run(["espeak-ng", "-v", voice, "-s", str(rate), "-p", str(pitch), "--stdout", word],
                         check=True, capture_output=True).stdout
    audio, rate_hz = soundfile.read(io.BytesIO(wav), dtype="float32")
    audio = torchaudio.functional.resample(torch.from_numpy(audio), rate_hz, SAMPLE_RATE).numpy()
    return trim(audio)


def trim(audio: np.ndarray) -> np.ndarray:
    frame = SAMPLE_RATE // 100
    energy = np.array([np.abs(audio[i:i + frame]).max() for i in range(0, len(audio), frame)])
    loud = np.flatnonzero(20 * np.log10(energy / energy.max() + 1e-9) > SILENCE_DB)
    pad = int(PAD_SECONDS * SAMPLE_RATE)
    start, stop = max(0, loud[0] * frame - pad), min(len(audio), (loud[-1] + 1) * frame + pad)
    return audio[start:stop]


def main() -> None:
    table = speakers(N_SPEAKERS)
    for spk in table:
        for digit, word in enumerate(WORDS):
            audio = synthesize(word, spk["voice"], spk["rate"], spk["pitch"])
            soundfile.write(OUT_DIR / f"{spk['speaker']}_{digit}.wav", audio, SAMPLE_RATE, subtype="PCM_16")
    (OUT_DIR / "speakers.json").write_text(json.dumps(table, indent=1) + "\n")


if __name__ == "__main__":
    main()
