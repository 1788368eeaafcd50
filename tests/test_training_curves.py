"""tools/training_curves.py: the validation scores it reads back from a run's TensorBoard logs are the ones the
trainer computed, step for step; bad runs and tags give a one-line error and no output."""
import shutil
import subprocess
import sys

import pandas as pd
import pytest

from tool_scripts import TOOLS, load_tool

curves = load_tool("training_curves.py", "training_curves")


def test_curves_match_the_validation_history_of_the_run(trained_model, tmp_path):
    model_dir, summary = trained_model
    history = pd.DataFrame(summary["validation_history"]).set_index("step")
    assert len(history) >= 3
    long = curves.read_scalars(model_dir, ["val/dsc_median", "val/tre_mm_median"])
    for tag, key in (("val/dsc_median", "dsc"), ("val/tre_mm_median", "tre_mm")):
        series = long[long["tag"] == tag].set_index("step")["value"]
        assert list(series.index) == list(history.index)
        pd.testing.assert_series_equal(series, history[key].astype(float), check_names=False, rtol=1e-6)
    # A second copy of the run: one column each, their median equal to either, and the kept step named.
    twin = tmp_path / "twin"
    shutil.copytree(model_dir, twin)
    output = tmp_path / "curves.md"
    assert curves.main([str(model_dir), str(twin), "--tags", "val/dsc_median", "--output", str(output)]) == 0
    table = curves.curve_table(pd.concat([long, long.assign(run="twin")]), "val/dsc_median")
    pd.testing.assert_series_equal(table["median"], table[model_dir.name], check_names=False)
    text = output.read_text()
    best_step = int(history["dsc"].idxmax())
    assert f"| {model_dir.name} | {best_step} | " in text and "| step | model | twin | median |" in text
    dsc = history["dsc"].astype(float)
    assert f"mean {dsc.iloc[-4:].mean():.3f} over steps {dsc.index[-4]}–{dsc.index[-1]})" in text
    assert curves.main([str(model_dir), "--smooth", "2", "--output", str(output)]) == 0
    assert f"mean {dsc.iloc[-2:].mean():.3f} over steps {dsc.index[-2]}–{dsc.index[-1]})" in output.read_text()
    assert curves.main([str(model_dir), "--output", str(tmp_path / "curves.csv")]) == 0
    written = pd.read_csv(tmp_path / "curves.csv")
    assert list(written.columns) == ["run", "step", "tag", "value"] and len(written) == 2 * len(history)


def test_bad_runs_and_tags_are_one_line_errors_with_no_output(trained_model, tmp_path):
    model_dir, _ = trained_model
    output = tmp_path / "out.md"
    for args, message in (([str(tmp_path)], "no TensorBoard event files"),
                          ([str(model_dir), "--tags", "val/nothing"], "no scalar val/nothing (validation tags there: "
                                                                      "val/dsc_median, val/tre_mm_median)")):
        run = subprocess.run([sys.executable, str(TOOLS / "training_curves.py"), *args, "--output", str(output)],
                             capture_output=True, text=True, timeout=300)
        errors = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
        assert run.returncode == 1 and len(errors) == 1 and message in errors[0], run.stderr[-2000:]
        assert not output.exists()
    with pytest.raises(SystemExit):
        curves.parse_args([str(model_dir), "--output", str(tmp_path / "no" / "such" / "out.md")])
    with pytest.raises(SystemExit):
        curves.parse_args([str(model_dir), "--output", str(tmp_path / "out.txt")])
    with pytest.raises(SystemExit):
        curves.parse_args([str(model_dir), "--smooth", "0"])
