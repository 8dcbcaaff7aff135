"""`demo --device cuda` end to end at quick settings (issue 15, item 3: bench got device="cuda", which
is no profile name). CUDA suite."""
from __future__ import annotations

import json

from irep_deploy.demo import DemoSettings, run_demo


def test_demo_on_cuda_finishes_and_benches_on_the_gpu(tmp_path):
    out = tmp_path / "demo"
    summary = run_demo(out, DemoSettings.quick(), device="cuda", progress=False, say=lambda line: None)
    assert [s["name"] for s in summary["steps"]][-2:] == ["bench", "figures"]
    bench = json.loads((out / "bench.json").read_text())
    assert bench["device"]["requested"] == "gpu" and bench["device"]["kind"] != "cpu"
    assert all(r["gpu"] is not None for r in bench["results"] if r["backend"] == "torch")
