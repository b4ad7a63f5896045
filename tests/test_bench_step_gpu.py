"""``bench/step_gpu.py`` runs every line on the CPU: its decoder, ViT and attention rows, at the CPU's sizes.

One run with ``--device cpu``: the kernels the CPU has give figures that agree with the closed-form FLOP
counts, those it lacks give the dispatcher's own reason (``why_not``), nothing else fails, and
FlexAttention's rows come last.
"""

import json
import subprocess
import sys

import pytest
import torch

from polytrain.config.registries import KERNELS
from polytrain.models.attention_mask import MaskRule
from tests.helpers import REPO

PEAK_TFLOPS = 2.0
DIM, LAYERS, HEADS, KV_HEADS, HIDDEN, VOCAB, SEQ, BATCH = 64, 2, 4, 2, 172, 512, 32, 2
"""The CPU's decoder (``SIZES["cpu"]``), written out again for the closed form."""
ATTENTION_BATCH, ATTENTION_SEQ, ATTENTION_HEADS, HEAD_DIM = 2, 128, 4, 64
CPU_HAS = {"decoder": {"sdpa", "sdpa_flash"}, "attention": {"sdpa_math", "sdpa", "sdpa_flash"}}
CPU_LACKS = ("sdpa_cudnn", "sdpa_efficient", "flex", "flash_attn")


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """(the figures of one CPU run, its printed lines, the figures it wrote to --out)."""
    out = tmp_path_factory.mktemp("bench") / "figures.json"
    done = subprocess.run([sys.executable, REPO / "bench" / "step_gpu.py", "--device", "cpu", "--no-compile",
                           "--peak-tflops", str(PEAK_TFLOPS), "--out", out], cwd=REPO / "bench",
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    return json.loads(lines[-1]), lines[:-1], json.loads(out.read_text())


def why_not(kernel: str) -> str:
    """The dispatcher's refusal of ``kernel`` for a plain bf16 call on the CPU."""
    valid = torch.ones(1, 4, dtype=torch.bool)
    reason = KERNELS.get(kernel).why_not(MaskRule(valid, valid, causal=True), torch.bfloat16, torch.device("cpu"),
                                         HEAD_DIM, 0.0, False)
    return f"attention kernel {kernel!r} cannot run this call: {reason}"


def test_every_row_has_figures_or_the_dispatchers_reason_and_nothing_else_fails(bench):
    figures, _, written = bench
    assert written == figures
    for section, has in CPU_HAS.items():
        rows = {key.split("/")[-1]: row for key, row in figures[section].items()}
        assert {kernel for kernel, row in rows.items() if "refused" not in row} == has, section
        for kernel in CPU_LACKS:
            assert rows[kernel] == {"refused": why_not(kernel)}, (section, kernel)
    vit = figures["vit"]["vit_tiny_patch16_224"]
    assert vit["speedup_vs_timm"] == pytest.approx(vit["images_per_s"]["polytrain"] / vit["images_per_s"]["timm"],
                                                   rel=2e-3)


def test_flex_rows_come_last(bench):
    _, lines, _ = bench
    rows = lines[1:]  # after the header
    flex = [i for i, line in enumerate(rows) if "  flex  " in line]
    assert flex == list(range(len(rows) - 3, len(rows)))


def test_decoder_mfu_is_6n_plus_the_whole_attention_square_and_the_causal_halved_figure_halves_it(bench):
    figures, lines, _ = bench
    per_layer = DIM * (DIM + 2 * KV_HEADS * DIM // HEADS) + DIM * DIM + DIM * 2 * HIDDEN + HIDDEN * DIM
    n = LAYERS * per_layer + VOCAB * DIM  # matrices a token meets, the output projection included
    whole, halved = 6 * n + 12 * LAYERS * DIM * SEQ, 6 * n + 6 * LAYERS * DIM * SEQ
    assert figures["peak_tflops"] == PEAK_TFLOPS and "6N + attention's whole square" in lines[0]
    for kernel in CPU_HAS["decoder"]:
        row = figures["decoder"][kernel]
        tokens_per_s = BATCH * SEQ / (row["ms"] / 1000)
        assert row["tflops"] == pytest.approx(tokens_per_s * whole / 1e12, rel=2e-3)
        assert row["mfu"] == pytest.approx(row["tflops"] / PEAK_TFLOPS, rel=2e-3)
        assert row["mfu_causal_halved"] == pytest.approx(row["mfu"] * halved / whole, rel=2e-3)


def test_attention_tflops_are_flashattentions_count(bench):
    figures, _, _ = bench
    for key, row in figures["attention"].items():
        if "refused" in row:
            continue
        square = ATTENTION_SEQ**2 / (2 if key.startswith("causal") else 1)
        forward = 4 * ATTENTION_BATCH * ATTENTION_HEADS * square * HEAD_DIM
        assert row["tflops"] == pytest.approx(3.5 * forward / (row["ms"] / 1000) / 1e12, rel=2e-3), key
