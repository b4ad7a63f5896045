import pytest
import torch

from polytrain.models.attention_mask import MaskRule
from tests.models.reference import MASK_CASES, allowed_by_loops, mask_case

VALID = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0, 0, 0]], dtype=torch.bool)
DOCS = torch.tensor([[0, 0, 0, 1, 1, 2, -1, -1], [0, 1, 1, -1, -1, -1, -1, -1]])

@pytest.mark.parametrize("case", MASK_CASES)
def test_dense_mask_equals_the_rule_written_out(case):
    rule, want = mask_case(case, VALID, DOCS)
    assert torch.equal(rule.dense()[:, 0].expand_as(want), want)


def test_cache_offset_and_cross_attention_rules_equal_the_rule_written_out():
    keys = torch.tensor([[1, 1, 0, 1, 1, 1]], dtype=torch.bool)  # a padded prompt, then cached text
    queries = torch.ones(1, 2, dtype=torch.bool)
    rule = MaskRule(keys, queries, causal=True, offset=4)
    assert torch.equal(rule.dense()[:, 0], allowed_by_loops(keys, queries, causal=True, offset=4))
    cross = MaskRule(keys, queries, self_attention=False)
    assert torch.equal(cross.dense()[:, 0].expand(1, 2, 6), keys[:, None, :].expand(1, 2, 6))


def test_no_row_is_empty_so_padding_never_makes_nan():
    rule = MaskRule(VALID, VALID, causal=True, query_docs_BL=DOCS, key_docs_BS=DOCS)
    assert rule.dense().any(-1).all()


def test_runs_are_the_documents_and_padding_as_flash_attn_varlen_sequences():
    rule = MaskRule(VALID, VALID, causal=True, query_docs_BL=DOCS, key_docs_BS=DOCS)
    cu_seqlens, longest = rule.runs()
    # row 0: docs of 3, 2, 1 tokens, padding 2; row 1 (offset 8): 1, 2, padding 5
    assert cu_seqlens.tolist() == [0, 3, 5, 6, 8, 9, 11, 16] and longest == 5
    assert cu_seqlens.dtype == torch.int32
    plain = MaskRule(VALID, VALID)
    assert plain.runs()[0].tolist() == [0, 6, 8, 11, 16]


def test_distance_counts_from_the_cache_offset():
    rule = MaskRule(torch.ones(1, 5, dtype=torch.bool), torch.ones(1, 2, dtype=torch.bool), offset=3)
    assert rule.distance().tolist() == [[3, 2, 1, 0, 1], [4, 3, 2, 1, 0]]
