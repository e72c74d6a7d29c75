"""`seqpack train --nproc 4` of an InternEvo config with ``parallel.sequence_2D`` enabled (2 Ulysses × 2 ring,
packed rows split in balanced chunks) trains, and its per-step losses and gradient norms equal the Ulysses-only run
(tensor.size=4) of the same data. Tolerances as in test_train_distributed.py (float32 round-off of sums taken in another order)."""

import pytest

from seqpack.train import load_config

from test_train_distributed import SGD, TINY, assert_close, cli, records

SEQ_2D = """
parallel = dict(
    tensor=dict(size=4, mode="isp"),
    sequence_2D=dict(enable=True, head_size=2, context_size=2, window_size=1,
                     device_placement_strategy=dict(head_first=True, interleaved=False)),
)
"""


def test_sequence_2d_config_trains_like_ulysses(tmp_path):
    config = tmp_path / "seq2d.py"
    config.write_text(SEQ_2D)
    steps = ["--data.micro_num", "2", "--train.max_steps", "2", "--ckpt.checkpoint_every", "100"]
    ring = cli(str(config), *TINY, *SGD, *steps, "--nproc", "4", "--run_dir", str(tmp_path / "2d"))
    assert ring.returncode == 0, ring.stdout[-2000:] + ring.stderr[-4000:]
    assert "world=4 (dp=1, sp=4 = 2 ring x 2 ulysses)" in ring.stdout
    ulysses = cli(*TINY, *SGD, *steps, "--parallel.tensor.size", "4", "--nproc", "4", "--run_dir",
                  str(tmp_path / "ulysses"))
    assert ulysses.returncode == 0, ulysses.stdout[-2000:] + ulysses.stderr[-4000:]
    got, want = records(tmp_path / "2d"), records(tmp_path / "ulysses")
    assert sorted(got) == sorted(want) == [1, 2]
    for step in want:
        assert_close(got[step]["loss"], want[step]["loss"], 1e-5, f"step {step} loss")
        assert_close(got[step]["grad_norm"], want[step]["grad_norm"], 2e-4, f"step {step} gradient norm")


@pytest.mark.parametrize("text, message", [
    ("parallel = dict(tensor=dict(size=4), sequence_2D=dict(enable=True, head_size=3, context_size=2))",
     r"head_size x context_size must equal parallel.tensor.size=4; use one of: head_size=4, context_size=1, "
     r"head_size=2, context_size=2, head_size=1, context_size=4"),
    ("parallel = dict(tensor=dict(size=4), sequence_2D=dict(enable=True, head_size=1, context_size=4, "
     "window_size=3))", "window_size=3 is not supported: must divide context_size=4"),
])
def test_sequence_2d_errors(tmp_path, text, message):
    path = tmp_path / "bad.py"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_config(str(path))


def test_sequence_2d_window_is_a_schedule(tmp_path):
    path = tmp_path / "w.py"
    path.write_text("parallel = dict(tensor=dict(size=8), sequence_2D=dict(enable=True, head_size=2, "
                    "context_size=4, window_size=2))")
    with pytest.warns(UserWarning, match="seqpack runs one ring over the context group"):
        cfg = load_config(str(path))
    assert cfg.parallel.ring_size == 4 and cfg.parallel.sequence_2D.head_size == 2
