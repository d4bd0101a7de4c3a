"""`tunelab demo-real`'s pipeline on the micro model (the real model runs in `make demo-real` and the bake-off)."""

import json

from tunelab.cli import main
from tunelab.outputs import read_marker


def test_demo_real_runs_end_to_end_on_a_local_model(tmp_path, base_model_dir, capsys):
    code = main(["demo-real", f"model={base_model_dir}", f"out_dir={tmp_path}", "questions=4", "finetune.steps=2",
                 "finetune.warmup_steps=0", "finetune.micro_batch_size=4"])
    out = capsys.readouterr()
    assert code == 0, out.err
    s = json.loads((tmp_path / "demo-real" / "summary.json").read_text(encoding="utf-8"))
    assert s["questions"] == 4 and len(s["answers"]) == 4 and {"before", "after"} <= set(s)
    assert all(a["expected"] and a["lang"] in ("en", "zh") for a in s["answers"])
    assert (tmp_path / "demo-real" / "facts" / "train.jsonl").read_text(encoding="utf-8").count('"task": "fact"') > 1000
    assert (tmp_path / "demo-real" / "finetune" / "adapter" / "adapter_config.json").is_file()
    assert read_marker(tmp_path / "demo-real")["kind"] == "demo-real run"
    assert "held-out fact questions" in out.out
