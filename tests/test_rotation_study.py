"""tools/rotation_study.py: what --reuse_from accepts and refuses (the study itself trains three networks and is run
by `make rotation-study`, not here)."""
import json

import pytest

from tool_scripts import load_tool

study = load_tool("rotation_study.py", "rotation_study_tool")


def finished_study(path, **changed):
    """A directory laid out as a finished study made with the default settings (``changed`` overrides some)."""
    settings = vars(study.parse_args(["--output_dir", str(path)]))
    settings.update(changed)
    for name in study.REUSED:
        (path / name).mkdir(parents=True)
    (path / "rotation_summary.json").write_text(json.dumps(
        {"args": settings, "seconds": {"segmenter": 1.0, "model": 2.0, "model_affine": 3.0},
         "best_validation": {"model": 0.8, "model_affine": 0.7}, "segmenter_validation": {"dsc": 0.9}}))
    return path


def refusal(capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        study.parse_args(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_reuse_from_accepts_a_study_with_the_same_settings_and_another_affine_setting(tmp_path, capsys):
    earlier = finished_study(tmp_path / "earlier", affine_pooling="flatten", affine_label_weight=0.0)
    args = study.parse_args(["--output_dir", str(tmp_path / "new"), "--reuse_from", str(earlier),
                             "--affine_pooling", "average", "--affine_label_weight", "0.5"])
    assert args.reused_summary["seconds"]["model"] == 2.0 and args.affine_label_weight == 0.5
    message = refusal(capsys, ["--output_dir", str(tmp_path / "new"), "--affine_label_weight", "-1"])
    assert message.endswith("--affine_label_weight must be >= 0, got -1.0")


def test_reuse_from_names_each_setting_that_differs(tmp_path, capsys):
    earlier = finished_study(tmp_path / "earlier", num_steps=1000, landmark_weight=0.3)
    message = refusal(capsys, ["--output_dir", str(tmp_path / "new"), "--reuse_from", str(earlier)])
    assert str(earlier) in message
    assert "--num_steps 1000 there, 1500 here" in message
    assert "--landmark_weight 0.3 there, 0.0 here" in message
    assert "--seed" not in message


def test_reuse_from_refuses_an_unfinished_or_incomplete_study_and_itself(tmp_path, capsys):
    message = refusal(capsys, ["--output_dir", str(tmp_path / "new"), "--reuse_from", str(tmp_path)])
    assert "no rotation_summary.json" in message and str(tmp_path) in message

    earlier = finished_study(tmp_path / "earlier")
    (earlier / "segmenter").rmdir()
    message = refusal(capsys, ["--output_dir", str(tmp_path / "new"), "--reuse_from", str(earlier)])
    assert message.endswith("segmenter missing")

    (earlier / "segmenter").mkdir()
    message = refusal(capsys, ["--output_dir", str(earlier), "--reuse_from", str(earlier)])
    assert "is --output_dir itself" in message

    (earlier / "rotation_summary.json").write_text("{not json")
    message = refusal(capsys, ["--output_dir", str(tmp_path / "new"), "--reuse_from", str(earlier)])
    assert "unreadable" in message


def test_reuse_from_reads_a_setting_older_studies_do_not_record_as_its_value_then(tmp_path, capsys):
    """Studies made before --augment_rotation_deg existed trained without rotation augmentation: 0 matches them."""
    earlier = finished_study(tmp_path / "earlier")
    summary = json.loads((earlier / "rotation_summary.json").read_text())
    del summary["args"]["augment_rotation_deg"]
    (earlier / "rotation_summary.json").write_text(json.dumps(summary))
    assert study.parse_args(["--output_dir", str(tmp_path / "new"), "--reuse_from", str(earlier)]).reused_summary
    message = refusal(capsys, ["--output_dir", str(tmp_path / "new"), "--reuse_from", str(earlier),
                               "--augment_rotation_deg", "30"])
    assert "--augment_rotation_deg 0.0 there, 30.0 here" in message
