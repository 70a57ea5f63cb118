"""The sampler's support with a vocabulary-parallel head (gloo, 2 and 3 processes): kept sets spanning the slices and
top-k / top-p / min-p thresholds found over the whole vocabulary (candidates all-gathered; histograms all-reduced past
them) give every rank the whole head's loss, per-token outputs, kept mass, kept sets and gradient slices."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import run_distributed

WORKER = Path(__file__).parent / "vocab_parallel" / "support_worker.py"


@pytest.mark.parametrize("slices", [[18, 19], [10, 15, 12]], ids=["2-ranks-uneven", "3-ranks-uneven"])
def test_support_on_a_sliced_head_matches_the_whole_head(slices):
    result = run_distributed(len(slices), [str(WORKER), ",".join(map(str, slices))], env={"TRITON_INTERPRET": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    assert result.stdout.count(": ok") == len(slices)
