"""``seqpack bench sp`` runs end to end (tiny T, sp = 1 and 2, real gloo ranks) and shows the memory split."""

import json

from seqpack.cli import main


def test_bench_sp_smoke(tmp_path, capsys):
    out = tmp_path / "sp.json"
    assert main(["bench", "sp", "--T", "384", "--sp", "1", "2", "--steps", "1", "--cap-mib", "0",
                 "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "saved act MiB" in table and "peak growth MiB" in table
    rows = json.loads(out.read_text())["fixed_T"]
    assert [r["sp"] for r in rows] == [1, 2] and [r["local_T"] for r in rows] == [384, 192]
    # activations kept for backward are split by the sequence shard (the model is identical on both ranks)
    assert rows[1]["saved_mib"] <= 0.6 * rows[0]["saved_mib"]
