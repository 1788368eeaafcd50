"""tools/self_check_study.py: its self-check is the one `register` writes, its landmark error read back from the
written displacement field is the one `evaluate` scores, and a model without a segmenter is a one-line error."""
import io
import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from tool_scripts import TOOLS, load_tool

tool = load_tool("self_check_study.py", "self_check_study")


def test_study_matches_register_and_evaluate(gland_model, phantom_dir, tmp_path):
    from label_reg import model_dir as md
    from label_reg.evaluate import evaluate, resolve_cases
    from label_reg.register import Registrar

    output = tmp_path / "study.csv"
    assert tool.main(["--model_dir", str(gland_model), "--data_dir", str(phantom_dir), "--output", str(output),
                      "--noprogress"]) == 0
    table = pd.read_csv(output).set_index("case")
    assert (table["run"] == gland_model.name).all()
    info, _ = md.read_info(gland_model)
    _, pairs, _ = resolve_cases(info, phantom_dir)
    assert list(table.index) == [p.name for p in pairs] and len(pairs) >= 3
    assert table["check_dsc"].between(0, 1).all() and np.isfinite(table["tre_world_mm"]).all()

    # The landmark error and the segmenter's centre error are evaluate's, for the model's found-gland row.
    evaluate(gland_model, tmp_path / "eval", data_dir=phantom_dir, progress=False, stream=io.StringIO(),
             cache_dir=tmp_path / "cache")
    per_case = pd.read_csv(tmp_path / "eval" / "per_case.csv")
    found = per_case[per_case["method"].str.endswith("(found gland)") & ~per_case["method"].str.startswith("Coarse")]
    found = found.set_index("case").loc[table.index]
    np.testing.assert_allclose(table["segmenter_centre_error_mm"], found["segmenter_centre_error_mm"], atol=1e-6)
    np.testing.assert_allclose(table["tre_world_mm"], found["tre_world_mm"], atol=0.25)

    # The check is the one register writes into registration.json for the same pair.
    pair = pairs[0]
    result = Registrar(gland_model).register(pair.moving_image, pair.fixed_image, pair.moving_label,
                                             output_dir=tmp_path / "one")
    check = json.loads((tmp_path / "one" / "registration.json").read_text())["quality_check"]
    assert check == result.report["quality_check"]
    assert table.loc[pair.name, "check_dsc"] == pytest.approx(check["dsc"], abs=1e-9)
    assert bool(table.loc[pair.name, "check_passed"]) == check["passed"]

    # Thresholds: above every DSC flags every pair, at the lowest flags none; the report says so.
    rows = table.reset_index()
    top, bottom = float(rows["check_dsc"].max()) + 1e-3, float(rows["check_dsc"].min())
    text = tool.markdown(rows, [bottom, top], "m")
    assert f"| {bottom:g} | 0 of {len(rows)} | – |" in text
    assert f"| {top:g} | {len(rows)} of {len(rows)} | " in text
    assert "Spearman check_dsc vs TRE: rho = " in text
    # Two runs pooled: every pair counted under each, named with its run.
    pooled = pd.concat([rows, rows.assign(run="other")], ignore_index=True)
    text = tool.markdown(pooled, [top], "m, other")
    assert f"| {top:g} | {2 * len(rows)} of {2 * len(rows)} | " in text and f"{pair.name} of other (" in text


def test_a_model_without_segmenter_and_bad_flags_are_refused(trained_model, tmp_path, readonly_dir):
    model_dir, _ = trained_model
    output = tmp_path / "study.md"
    run = subprocess.run([sys.executable, str(TOOLS / "self_check_study.py"), "--model_dir", str(model_dir),
                          "--output", str(output), "--noprogress"], capture_output=True, text=True, timeout=300)
    errors = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
    assert run.returncode == 2 and len(errors) == 1 and "TRUS volume centre" in errors[0], run.stderr[-2000:]
    assert not output.exists()
    for args in ([str(model_dir)], ["--min_dsc", "0.8,x"], ["--min_dsc", "1.5"], ["--fold", "-1"],
                 ["--output", str(tmp_path / "a.txt")], ["--output", str(tmp_path / "no" / "a.md")],
                 ["--output", str(readonly_dir / "a.md")]):
        with pytest.raises(SystemExit):
            tool.parse_args(["--model_dir", str(model_dir), *args])
    assert list(readonly_dir.iterdir()) == []
