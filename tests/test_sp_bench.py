"""``seqpack bench sp`` runs end to end (tiny T, sp = 1 and 2, real gloo ranks) and shows the memory split."""

import json

from seqpack.cli import main


def test_bench_sp_smoke(tmp_path, capsys):
    out = tmp_path / "sp.json"
    assert main(["bench", "sp", "--T", "384", "--sp", "1", "2", "--steps", "1", "--cap-mib", "0",
                 "--split", "2:2", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "saved act MiB" in table and "peak growth MiB" in table
    rows = json.loads(out.read_text())["fixed_T"]
    assert [r["sp"] for r in rows] == [1, 2] and [r["local_T"] for r in rows] == [384, 192]
    # activations kept for backward are split by the sequence shard (the model is identical on both ranks)
    assert rows[1]["saved_mib"] <= 0.6 * rows[0]["saved_mib"]
    # ring only at sp=2: forward sends k/v once, backward k/v + fp32 dk/dv, then dk/dv home (counted, not assumed)
    ring, ulysses = json.loads(out.read_text())["splits"][0], rows[1]
    kv_mib = 2 * 192 * 2 * 32 * 4 / 2**20  # k and v of one rank's 192 tokens, 2 KV heads of 32, float32
    assert abs(ring["sent_mib_per_layer"] - 4 * kv_mib) < 1e-9 and ulysses["sent_mib_per_layer"] > 0
    assert 0 <= ring["attn_imbalance"] <= 0.10 and "Ulysses vs ring vs 2D" in table
