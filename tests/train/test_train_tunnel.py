"""ModelTunnel-style search: proxies scale as specified, hopeless runs stop early, best rates and report."""

import json
import math

from train_util import bench_items, make_shards, small_tokenizer, tiny_config

from minicpm4.train.tunnel import best_rates, coordinate_check, proxy_overrides, sweep, write_report


def test_proxy_shapes(tmp_path):
    base = tiny_config(tmp_path, tmp_path / "run")  # hidden 64, 4 heads (head_dim 16), GQA group 2
    mup, sp = proxy_overrides(base, 128, 32, "mup"), proxy_overrides(base, 128, 32, "sp")
    assert (mup["hidden_size"], mup["num_attention_heads"], mup["num_key_value_heads"]) == (128, 8, 4)
    assert mup["intermediate_size"] == 256 and mup["head_dim"] == 16
    assert mup["dim_model_base"] == 32 and sp["dim_model_base"] == 128


def test_sweep_stops_hopeless_runs_and_reports(tmp_path, real_text):
    shards = make_shards(tmp_path, real_text, small_tokenizer(real_text))
    base = tiny_config(shards, tmp_path / "unused", steps=6, warmup_steps=1, decay_steps=1)
    results = sweep(base, [32, 64], [0.05, 200.0], ["mup"], grace=0.3, work=tmp_path / "runs",
                    bench=bench_items(real_text))
    by = {(r["width"], r["lr"]): r for r in results}
    for width in (32, 64):
        good, bad = by[(width, 0.05)], by[(width, 200.0)]
        assert good["steps"] == 6 and not good["stopped"] and math.isfinite(good["loss"])
        assert bad["stopped"] and bad["steps"] < 6 and bad["loss"] == math.inf  # diverged: cut short
        # finished runs are scored on the items (answer loss below uniform's log(400) after training), stopped not
        assert 0 < good["bench_loss"] < math.log(400) and 0 <= good["bench_acc"] <= 1 and "bench_loss" not in bad
    assert {w: v["lr"] for w, v in best_rates(results)["mup"].items()} == {32: 0.05, 64: 0.05}
    coord = coordinate_check(base, [32, 64], 0.05, 2, ["mup", "sp"], tmp_path / "coord")
    assert coord["mup"][32] == coord["sp"][32]  # at the base width the two parametrisations coincide
    assert coord["sp"][64][-1] > coord["mup"][64][-1]  # sp's larger init and rate at 2x width: larger activations
    summary = write_report(tmp_path / "report", results, coord, with_plot=False)  # matplotlib: ~4 s to import
    assert summary["lr_drift"]["mup"] == 1.0
    assert json.loads((tmp_path / "report" / "summary.json").read_text())["best"]["mup"]["64"]["lr"] == 0.05
    assert len((tmp_path / "report" / "results.jsonl").read_text().splitlines()) == 4
