"""Codebook usage figures against counts done by hand: which codes, how often, padding never counted."""

from __future__ import annotations

import math

import pytest
import torch

from vqtrain.metrics import CodebookUsage, LastUse, count_codes, usage_summary


def test_count_codes_per_column_ignores_padding():
    # two index columns (residual levels) of sizes 4 and 3; -1 marks padding
    indices = torch.tensor([[[0, 2], [3, 2], [-1, -1]], [[0, 0], [-1, -1], [3, 1]]])
    counts = count_codes(indices, [4, 3])
    assert counts.tolist() == [[2, 0, 0, 2], [1, 1, 2, 0]]


def test_summary_equals_hand_computed_figures():
    counts = torch.tensor([[2, 0, 0, 2], [1, 1, 2, 0]])
    summary = usage_summary(counts, [4, 3])
    # codebook 0: codes {0, 3} of 4, each half the time; codebook 1: all 3 of 3, with shares 1/4, 1/4, 1/2
    entropy0, entropy1 = math.log(2), -(2 * 0.25 * math.log(0.25) + 0.5 * math.log(0.5))
    per = summary["per_codebook"]
    torch.testing.assert_close(per["utilization"], torch.tensor([0.5, 1.0]))
    torch.testing.assert_close(per["perplexity"], torch.tensor([2.0, math.exp(entropy1)]))
    torch.testing.assert_close(
        per["entropy_utilization"], torch.tensor([entropy0 / math.log(4), entropy1 / math.log(3)])
    )
    torch.testing.assert_close(per["dead_codes"], torch.tensor([2.0, 0.0]))
    torch.testing.assert_close(summary["utilization"], torch.tensor(0.75))
    torch.testing.assert_close(summary["perplexity"], torch.tensor((2 + math.exp(entropy1)) / 2))
    assert summary["dead_codes"] == 2


@pytest.mark.parametrize("tokens", [10, 1000])
def test_entropy_utilization_is_one_for_uniform_use_whatever_the_token_count(tokens):
    counts = torch.full((1, 10), tokens // 10)
    summary = usage_summary(counts, [10])
    assert summary["entropy_utilization"].item() == pytest.approx(1.0)
    assert summary["utilization"] == 1 and summary["perplexity"].item() == pytest.approx(10.0)


def test_one_code_in_use_has_perplexity_one_and_zero_entropy_utilization():
    summary = usage_summary(torch.tensor([[0, 7, 0, 0]]), [4])
    assert summary["perplexity"] == 1 and summary["entropy_utilization"] == 0
    assert summary["utilization"] == 0.25 and summary["dead_codes"] == 3


def test_nothing_counted_is_all_dead_not_nan():
    summary = usage_summary(torch.zeros(1, 8, dtype=torch.long), [8])
    assert summary["utilization"] == 0 and summary["dead_codes"] == 8
    assert torch.isfinite(summary["perplexity"]) and torch.isfinite(summary["entropy_utilization"])


def test_codebook_usage_accumulates_until_reset():
    usage = CodebookUsage([5])
    usage.update(count_codes(torch.tensor([[0, 1, -1]]), [5]))
    usage.update(count_codes(torch.tensor([[1, 4, -1]]), [5]))
    assert usage.counts.tolist() == [[1, 2, 0, 0, 1]]
    assert usage.compute()["utilization"] == pytest.approx(0.6)
    usage.reset()
    assert usage.counts.sum() == 0


def test_last_use_counts_codes_unused_for_the_window_as_dead():
    last_use = LastUse([4, 2], window=3)
    last_use.update(count_codes(torch.tensor([[0, 1]]), [4, 2]), step=0)  # level 0 uses code 0, level 1 code 1
    last_use.update(count_codes(torch.tensor([[2, 1]]), [4, 2]), step=2)
    # at step 3 the window is steps 1-3: level 0 used code 2 only, level 1 code 1 only
    assert last_use.dead_codes(step=3) == 3 + 1
    # at step 2 the window is steps 0-2: level 0 used codes 0 and 2, level 1 code 1
    assert last_use.dead_codes(step=2) == 2 + 1
