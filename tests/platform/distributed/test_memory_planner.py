"""The memory planner's arithmetic against hand-computed cases, its recommendation and its CLI.

Its agreement with memory measured on 2-process CPU runs is in test_engine_runs.py.
"""

import pytest
import torch

from polytrain.cli import main
from polytrain.config import load_config
from polytrain.errors import ConfigError
from polytrain.job import resolve
from polytrain.platform.distributed.memory_planner import (
    OPTIONS,
    Option,
    activation_bytes,
    estimate,
    parse_size,
    plan,
)
from polytrain.platform.observe.meters import GIB, StateProbe
from tests.helpers import REPO

TINY = REPO / "configs" / "tiny.yaml"


def tiny(*overrides):
    return load_config(TINY, list(overrides))


@pytest.mark.parametrize("option, precision, expected", [
    # Ψ = 1000 parameters, Ψt = 800 trainable, N = 4 ranks, bucket 100 values; (params, grads, optimizer, buffers, cpu)
    (Option(0), "fp32", (4000, 3200, 6400, 0, 0)),
    (Option(0), "bf16", (2000, 800 * 6, 800 * 12, 0, 0)),
    (Option(1), "fp32", (4000, 800 * 4, 800 * 12 // 4, 0, 0)),  # whole gradients before the reduction
    (Option(2), "bf16", (2000, 800 * 6 // 4, 800 * 12 // 4, 200, 0)),
    (Option(3), "fp32", (1000, 800 * 8 // 4, 800 * 12 // 4, 400, 0)),
    (Option(2, offload_optimizer=True), "fp32", (4000, 800 * 4 // 4, 0, 400, 800 * 16 // 4)),
    (Option(3, True, True), "bf16", (0, 800 * 2 // 4, 0, 200, 500 + 800 * 16 // 4)),
])
def test_estimate_matches_hand_computed_bytes(option, precision, expected):
    cfg = tiny(f"engine.precision={precision}", "engine.bucket_size=100")
    row = estimate(cfg, option, world_size=4, n_params=1000, n_trainable=800, activations=7)
    assert (row.params, row.grads, row.optimizer, row.buffers, row.cpu) == expected
    assert row.device_total == sum(expected[:4]) + 7


def test_count_parameters_counts_frozen_ones_apart():
    everything, trainable = resolve(TINY).parameter_counts()
    frozen_all, frozen_trainable = resolve(TINY, ["finetune.freeze=[backbone.*]"]).parameter_counts()
    assert frozen_all == everything and frozen_trainable < trainable
    dim, hidden = 32, 64  # the tiny recipe's backbone: one encoder block, one decoder block with cross-attention
    attention, mlp, norm = 4 * (dim * dim + dim), dim * hidden + hidden + hidden * dim + dim, 2 * dim
    assert trainable - frozen_trainable == (attention + mlp + 2 * norm) + (2 * attention + mlp + 3 * norm) + 2 * norm


def test_recommends_the_least_sharding_that_fits():
    cfg = tiny("model.backbone.dim=256", "model.backbone.n_heads=4", "engine.bucket_size=1000")
    job = resolve(TINY)
    count, grids = job.parameter_counts, job.grids()
    rows, best = plan(cfg, gpus_per_node=4, nodes=2, gpu_mem=80 * GIB, count=count, grids=grids)
    assert [r.option for r in rows] == list(OPTIONS) and best.option == Option(0)
    needs = {r.option: r.device_total for r in rows}
    between = (needs[Option(2)] + needs[Option(3)]) / 2 / 0.9  # stage 3 fits, stage 2 does not
    assert plan(cfg, 4, 2, int(between), count, grids)[1].option == Option(3)
    assert plan(cfg, 4, 2, 1, count, grids)[1] is None


def test_plan_cli_prints_every_option_and_a_recommendation(capsys):
    assert main(["plan", str(TINY), "model.backbone.dim=64", "--gpus-per-node", "8", "--nodes", "2",
                 "--gpu-mem", "40GiB"]) == 0
    out = capsys.readouterr().out
    assert "16 ranks, 40.0 GiB each" in out
    assert all(option.label in out for option in OPTIONS)
    assert out.strip().endswith("recommended: engine.zero_stage=0 engine.offload_optimizer=false "
                                "engine.offload_params=false")



@pytest.mark.parametrize("sequence_parallel, expected", [(1, 840_704), (2, 433_152), (4, 229_376)])
def test_each_rank_keeps_the_activations_of_its_slice_of_every_sequence(sequence_parallel, expected):
    """Hand-computed for the tiny recipe (fp32; a block saves 10 x 32 + 2 x 64 = 448 values per token, cross-attention
    128 more, logits 2 x 512 fp32): image_to_text 4 x (4 patches, 17 target tokens), text_lm 2 x 32 tokens, each
    sequence cut into ceil(L / N) tokens per rank."""
    heads = "model.backbone.n_heads=4"  # N = 4 must divide them
    cfg = tiny(heads, f"engine.sequence_parallel={sequence_parallel}")
    grids = resolve(TINY).grids()
    assert activation_bytes(cfg, grids) == activation_bytes(tiny(heads), grids, sequence_parallel) == expected


def test_a_masked_lm_counts_the_logits_of_the_text_its_encoder_reads():
    """configs/mlm.yaml by hand (fp32; a post-norm block of 128 wide with a 512-wide MLP saves 10 x 128 + 2 x 512
    values per token): 32 samples x 64 tokens x (3 blocks x 2304 values x 4 bytes + logits 2 x 512 fp32)."""
    cfg = load_config(REPO / "configs" / "mlm.yaml", ["engine.precision=fp32"])
    assert (cfg.model.backbone.mlp_hidden, cfg.tokenizers.text.vocab_size) == (512, 512)
    assert activation_bytes(cfg, {}) == 32 * 64 * (3 * (10 * 128 + 2 * 512) * 4 + 2 * 512 * 4)


LLAMA_7B_32K = """
model:
  backbone: {dim: 4096, n_heads: 32, encoder_layers: 0, decoder_layers: 32, mlp: swiglu, mlp_width: 11008,
             norm: rmsnorm, bias: false, position: rope}
  tie_embeddings: false
tokenizers:
  text: {vocab_size: 32000, max_len: 32768}
data:
  tasks:
    lm: {head: decoder_only, train: "builtin:stdlib/train", val: "builtin:stdlib/val", batch_size: 1, seq_len: 32768}
engine: {precision: bf16}
"""
"""A Llama-7B-shaped decoder on one 32k-token sequence (the README's example)."""


def test_plan_names_the_sequence_parallel_size_a_long_sequence_needs(tmp_path, data_cache, capsys):
    recipe = tmp_path / "llama_7b_32k.yaml"
    recipe.write_text(LLAMA_7B_32K)
    assert main(["plan", str(recipe), f"data.cache_dir={data_cache}", "--gpus-per-node", "8", "--gpu-mem",
                 "80GB"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    per_token = 32 * 2 * (10 * 4096 + 2 * 11008) + 2 * 32000 * 4  # bf16 blocks, fp32 logits and their gradient
    sizes = " | ".join(f"N={n} {per_token * 32768 // n / GIB:.2f}" for n in (1, 2, 4, 8))
    assert sizes == "N=1 130.81 | N=2 65.41 | N=4 32.70 | N=8 16.35"
    assert lines[-3].endswith(f"(32,768 tokens) with engine.sequence_parallel=N (configured: 1): {sizes}")
    longest = int(lines[-2].split("up to ")[1].split(" tokens")[0].replace(",", ""))
    assert 8_192 < longest < 32_768 and f"N=4 up to {4 * longest:,}" in lines[-2]
    assert lines[-1].startswith("recommended: engine.sequence_parallel=4 engine.zero_stage=1 "
                                "engine.offload_optimizer=false engine.offload_params=false")
    assert "nothing fits" not in "\n".join(lines)

@pytest.mark.parametrize("text, size", [("80GB", 80 * GIB), ("40GiB", 40 * GIB), ("24G", 24 * GIB),
                                        ("512MB", 512 * 2**20), ("1.5T", int(1.5 * 2**40))])
def test_parse_size(text, size):
    assert parse_size(text) == size


def test_bad_gpu_mem_names_the_option(capsys):
    assert main(["plan", str(TINY), "--gpu-mem", "lots"]) == 2
    assert "--gpu-mem='lots'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="gpus-per-node"):
        plan(tiny(), gpus_per_node=0, nodes=1, gpu_mem=GIB, count=resolve(TINY).parameter_counts, grids={})


def test_state_probe_sees_adam_states_after_the_first_step():
    probe = StateProbe()
    weight = torch.nn.Parameter(torch.zeros(1000, 250))  # 1 MB of fp32
    optimizer = torch.optim.AdamW([weight])
    probe.attach(optimizer)
    assert probe.take() is None  # no step yet
    weight.grad = torch.ones_like(weight)
    optimizer.step()
    assert probe.take() == pytest.approx(4 * 1_000_000, rel=0.01)  # weight, grad, exp_avg, exp_avg_sq
    assert probe.take() is None


def test_state_probe_waits_for_every_group_of_a_step():
    """DeepSpeed steps the torch optimizer once per parameter group: the states are whole after the last call."""
    probe = StateProbe()
    small, large = torch.nn.Parameter(torch.zeros(250)), torch.nn.Parameter(torch.zeros(1000, 250))
    optimizer = torch.optim.AdamW([{"params": [small]}, {"params": [large]}])
    probe.attach(optimizer)
    groups = optimizer.param_groups
    small.grad, large.grad = torch.ones_like(small), torch.ones_like(large)
    for group in groups:  # as DeepSpeed's ZeRO optimizer does
        optimizer.param_groups = [group]
        optimizer.step()
    assert probe.take() == pytest.approx(4 * 1_001_000, rel=0.01)


def test_a_towers_parameters_and_activations_are_counted():
    """An image tower of E=16, L=2 blocks (MLP 32), a linear projector into the backbone's 32: its parameters
    (frozen apart) and per image (4 patches + class token) 5 x (10 E + 2 H) values per block."""
    from polytrain.platform.distributed.memory_planner import activation_bytes

    tower = ["model.towers.image={dim: 16, layers: 2, n_heads: 2, mlp_width: 32, projector: linear}"]
    plain, with_tower = resolve(TINY), resolve(TINY, tower)
    dim, hidden, patch = 16, 32, 16
    block = 4 * (dim * dim + dim) + dim * hidden + hidden + hidden * dim + dim + 4 * dim
    stem = patch * dim + dim + dim + 5 * dim  # projection, class token, positions of the 2x2 grid and the class
    patch_embedder = patch * 32 + 32 + 32 + 4 * 32  # what it replaces: projection, modality vector, row and col
    tower_params = stem + 2 * block + 2 * dim + (dim * 32 + 32) + 32  # final norm, projector, modality vector
    assert with_tower.parameter_counts()[0] - plain.parameter_counts()[0] == tower_params - patch_embedder
    frozen = resolve(TINY, [*tower, "finetune.freeze=[embedders.image.tower.*]"]).parameter_counts()
    assert frozen[0] - frozen[1] == tower_params - (dim * 32 + 32) - 32
    batch = with_tower.cfg.data.tasks["image_to_text"].batch_size
    added = activation_bytes(with_tower.cfg, with_tower.grids()) - activation_bytes(plain.cfg, plain.grids())
    assert added == batch * 5 * (10 * dim + 2 * hidden) * 2 * 4
