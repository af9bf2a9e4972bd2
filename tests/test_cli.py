"""The mmv command: argument handling and the light subcommands."""

import csv
import json
import re
import subprocess
import sys

import pytest

from mmv.cli import build_parser, main


def test_pretrain_prints_the_resolved_config_with_overrides(tmp_path, capsys):
    config = tmp_path / "run.toml"
    config.write_text('[model]\npreset = "vit_tiny"\n[optim]\nsteps = 7\n')
    status = main(["pretrain", "--config", str(config), "--set", "optim.lr=0.002", "--set", "run.seed=5", "--print-config"])
    assert status == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["model"]["preset"] == "vit_tiny"
    assert printed["optim"] == {**printed["optim"], "steps": 7, "lr": 0.002}
    assert printed["run"]["seed"] == 5


def test_bad_input_exits_with_status_2_and_names_it(tmp_path, capsys):
    assert main(["pretrain", "--config", str(tmp_path / "absent.toml")]) == 2
    assert "absent.toml" in capsys.readouterr().err
    assert main(["pretrain", "--set", "optim.learning_rate=1", "--print-config"]) == 2
    assert "learning_rate" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["phantom", "--out", str(tmp_path), "--count", "0"])
    # The demo checks its overrides before it writes any phantom.
    assert main(["demo", "--out", str(tmp_path / "demo"), "--set", "ssl.temperature=0.1"]) == 2
    assert "temperature" in capsys.readouterr().err
    assert not (tmp_path / "demo" / "phantoms").exists()


def test_phantom_subcommand_writes_a_manifest(tmp_path):
    assert main(["phantom", "--out", str(tmp_path), "--count", "2", "--ct-spacing", "12", "--xray-spacing", "6"]) == 0
    with open(tmp_path / "manifest.csv", newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert len(rows) == 4 and all((tmp_path / row["path"]).is_file() for row in rows)


def test_module_entry_point_lists_the_subcommands():
    completed = subprocess.run([sys.executable, "-m", "mmv.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0
    for command in ("pretrain", "phantom", "demo", "probe", "analyze"):
        assert command in completed.stdout


def test_demo_help_states_the_defaults_it_runs_with(capsys):
    from mmv.demo import DemoSettings

    defaults = DemoSettings()
    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag, value in (("--phantoms", defaults.num_phantoms), ("--steps", defaults.steps), ("--threads", defaults.threads)):
        assert re.search(rf"{flag} [A-Z]+ [^-]*\(default: {value}\)", text), flag
    assert build_parser().parse_args(["demo"]).phantoms is None  # unset flags leave the choice to DemoSettings
