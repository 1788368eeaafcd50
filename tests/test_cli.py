"""The ``label-reg`` console script: every subcommand's --help lists that subcommand's own flags."""
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
ENV = dict(os.environ, CUDA_VISIBLE_DEVICES="")

OWN_FLAGS = {  # a few flags each subcommand defines
    "train": ["--data_dir", "--model_dir", "--num_steps", "--base_filters"],
    "register": ["--moving_image", "--fixed_image", "--moving_label", "--moving_points", "--model", "--data_dir"],
    "evaluate": ["--model", "--output_dir", "--cases_csv", "--figures"],
    "export": ["--model", "--output_dir", "--version"],
    "compare": ["--results", "--niftynet_dir"],
    "phantoms": ["--num_pairs", "--output_dir", "--seed", "--max_rotation_deg", "--overwrite"],
}


@pytest.mark.parametrize("name", sorted(OWN_FLAGS))
def test_subcommand_help_lists_its_flags(name):
    run = subprocess.run([sys.executable, "-m", "label_reg.cli", name, "--help"], cwd=REPO, env=ENV,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith(f"usage: label-reg {name}")
    for flag in OWN_FLAGS[name]:  # absl shows a boolean flag as --[no]name
        assert f"  {flag}:" in run.stdout or f"  --[no]{flag[2:]}:" in run.stdout, (flag, run.stdout)
    assert "--verbosity" not in run.stdout  # absl's own flags only with --helpfull
    assert run.stderr == ""  # TensorFlow's start-up lines are silenced too
