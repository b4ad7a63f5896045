"""A synthetic air-writing dataset: a wrist accelerometer (3 axes, 50 Hz) while the wearer writes a digit
in the air; the target is the digit's word ("zero" ... "nine"), the same words the built-in digit images
and spoken digits have, in a modality polytrain does not ship.

Each digit is a pen path (a polyline of control points in a unit box, smoothed); a recording moves the wrist
along it at the writer's own size, slant, speed and timing, and the sensor measures the second derivative
of that path plus gravity, both turned into the sensor's axes by how the writer wears the device (up to
about 30 degrees off, and a little different every time), plus sensor noise. The last ``HELD_OUT_WRITERS`` writers are held out, so validation asks about people never
seen.

Registered with polytrain through the ``polytrain.datasets`` entry point, so a recipe names it
``builtin:air_digits/train`` (and ``/val``); polytrain builds it once under ``data.cache_dir``.
"""

from pathlib import Path

import numpy as np

SAMPLE_RATE = 50
"""Hz."""
SECONDS = 3.0
STEPS = int(SAMPLE_RATE * SECONDS)
GRAVITY = 9.81
"""m/s^2."""
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
WRITERS = 30
HELD_OUT_WRITERS = 6
TAKES = 4
"""Recordings of each digit per writer."""
NOISE = 0.1
"""Sensor noise, m/s^2 (standard deviation)."""
SEED = 20261129
STROKES = {
    0: [(0.5, 1.0), (0.15, 0.8), (0.1, 0.4), (0.3, 0.02), (0.7, 0.02), (0.9, 0.4), (0.85, 0.8), (0.5, 1.0)],
    1: [(0.3, 0.75), (0.55, 1.0), (0.55, 0.0)],
    2: [(0.1, 0.75), (0.35, 0.98), (0.75, 0.95), (0.85, 0.7), (0.1, 0.0), (0.9, 0.0)],
    3: [(0.1, 0.9), (0.75, 0.98), (0.8, 0.7), (0.4, 0.52), (0.85, 0.35), (0.75, 0.03), (0.1, 0.1)],
    4: [(0.7, 0.0), (0.7, 1.0), (0.05, 0.35), (0.95, 0.35)],
    5: [(0.85, 1.0), (0.2, 1.0), (0.15, 0.55), (0.65, 0.6), (0.9, 0.3), (0.65, 0.0), (0.1, 0.08)],
    6: [(0.8, 0.98), (0.3, 0.8), (0.1, 0.35), (0.3, 0.02), (0.75, 0.05), (0.85, 0.35), (0.5, 0.52), (0.12, 0.35)],
    7: [(0.1, 1.0), (0.9, 1.0), (0.35, 0.0)],
    8: [(0.5, 0.55), (0.15, 0.8), (0.5, 1.0), (0.85, 0.8), (0.5, 0.55), (0.1, 0.25), (0.5, 0.0), (0.9, 0.25),
        (0.5, 0.55)],
    9: [(0.85, 0.75), (0.5, 0.5), (0.15, 0.72), (0.5, 0.98), (0.85, 0.78), (0.8, 0.4), (0.6, 0.0)],
}
"""Pen path of each digit: control points (x right, y up) in the unit box, in writing order."""


def air_digits(folder: Path) -> dict[str, list[dict]]:
    """Write every recording as ``.npy`` under ``folder``; returns the manifest lines of each split."""
    rng = np.random.default_rng(SEED)
    (folder / "recordings").mkdir()
    splits = {"train": [], "val": []}
    for writer in range(WRITERS):
        style = {"size": rng.uniform(0.25, 0.45), "slant": rng.uniform(-0.3, 0.3), "pace": rng.uniform(0.8, 1.25),
                 "wearing": small_rotation(rng, radians=0.5)}
        for digit, word in enumerate(WORDS):
            for take in range(TAKES):
                recording = record(digit, style, rng).astype(np.float32)
                name = f"recordings/w{writer:02d}_{digit}_{take}.npy"
                np.save(folder / name, recording)
                split = "val" if writer >= WRITERS - HELD_OUT_WRITERS else "train"
                splits[split].append({"motion": name, "target": word, "id": Path(name).stem})
    return splits


def record(digit: int, style: dict, rng: np.random.Generator) -> np.ndarray:
    """One recording (STEPS, 3) in m/s^2: still, writing, still."""
    duration = style["pace"] * rng.uniform(1.2, 1.8)
    moving = int(duration * SAMPLE_RATE)
    onset = rng.integers(0, STEPS - moving)
    path_M2 = pen_path(digit, moving, rng) * style["size"] * rng.uniform(0.9, 1.1)
    path_M2[:, 0] += style["slant"] * path_M2[:, 1]
    position = np.zeros((STEPS, 3))
    position[onset: onset + moving, :2] = path_M2
    position[onset + moving:, :2] = path_M2[-1]
    position[:onset, :2] = path_M2[0]
    acceleration = smooth(np.gradient(np.gradient(position, axis=0), axis=0) * SAMPLE_RATE**2)
    acceleration[:, 2] += GRAVITY  # the writing plane faces the writer; z is up
    sensor = style["wearing"] @ small_rotation(rng, radians=0.15)
    return acceleration @ sensor.T + rng.normal(0, NOISE, acceleration.shape)


def pen_path(digit: int, samples: int, rng: np.random.Generator) -> np.ndarray:
    """(samples, 2) points along the digit's jittered control points, at constant speed along the path."""
    points = np.array(STROKES[digit]) + rng.normal(0, 0.03, (len(STROKES[digit]), 2))
    dense = np.concatenate([np.linspace(a, b, 50, endpoint=False) for a, b in zip(points[:-1], points[1:])]
                           + [points[-1:]])
    dense = smooth(dense, width=15)
    arc = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(dense, axis=0), axis=1))])
    # ease in and out: the pen starts and stops at rest
    along = arc[-1] * (1 - np.cos(np.linspace(0, np.pi, samples))) / 2
    return np.stack([np.interp(along, arc, dense[:, i]) for i in range(2)], axis=1)


def smooth(values: np.ndarray, width: int = 5) -> np.ndarray:
    """Moving average along axis 0, edges padded with the end values."""
    kernel = np.ones(width) / width
    padded = np.pad(values, ((width // 2, width - 1 - width // 2), (0, 0)), mode="edge")
    return np.stack([np.convolve(padded[:, i], kernel, mode="valid") for i in range(values.shape[1])], axis=1)


def small_rotation(rng: np.random.Generator, radians: float) -> np.ndarray:
    """A rotation by at most ``radians`` about a random axis (Rodrigues' formula)."""
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    angle = rng.uniform(0, radians)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k
