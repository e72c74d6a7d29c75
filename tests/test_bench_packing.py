"""``seqpack bench packing``'s exactness columns: the per-document loss and the leak probe tell exact methods from
``model(input_ids, position_ids)`` with the default use_cache=True, where transformers (5.24) skips its
packed-sequence detection and lets documents attend to each other; with use_cache=False it separates them."""

import pytest

from seqpack.bench.measure import LEAK_TOLERANCE, render_table
from seqpack.bench.packing import run_one


@pytest.mark.parametrize("method, exact", [("seqpack", True), ("sdpa-packed", True), ("sdpa-posids", False),
                                           ("padded", True)])
def test_bench_reports_which_methods_are_exact(method, exact):
    r = run_one(method, 256, steps=1, seed=0, dist="lognormal", model_name="tiny", median=40)
    assert r["docs"] > 1 and r["step_s"] > 0
    if exact:
        assert r["leak"] == 0.0 and abs(r["loss"] - r["exact_loss"]) <= 1e-5 * r["exact_loss"], r
    else:  # position_ids alone do not separate documents: the loss is not the per-document loss
        assert r["leak"] > 100 * LEAK_TOLERANCE and abs(r["loss"] - r["exact_loss"]) > 1e-4, r
    table = render_table([r])
    assert ("| yes |" in table) is exact and ("**no**" in table) is not exact
