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


def help_entries(help_text):
    """``[invocation, help]`` of every argument an argparse help text lists."""
    entries, listing = [], False
    for line in help_text.splitlines():
        if line and not line.startswith(" ") and line.endswith(":"):
            listing = True  # "positional arguments:", "options:" or a group's title
            continue
        if not listing or not line.strip():
            continue
        if re.match(r"  \S", line):
            invocation, _, text = line[2:].partition("  ")
            entries.append([invocation, text.strip()])
        else:
            entries[-1][1] = f"{entries[-1][1]} {line.strip()}".strip()
    return entries


def command_help(capsys, *arguments):
    with pytest.raises(SystemExit) as stop:
        build_parser().parse_args([*arguments, "--help"])
    assert stop.value.code == 0
    return capsys.readouterr().out


def test_every_option_of_every_subcommand_has_help_text(capsys):
    usage = command_help(capsys)
    commands = re.search(r"\{([a-z,]+)\}", usage).group(1).split(",")
    assert {"pretrain", "phantom", "demo", "embed", "probe", "analyze"} <= set(commands)
    for command in commands:
        entries = help_entries(command_help(capsys, command))
        assert len(entries) > 1, command
        for invocation, text in entries:
            assert text, f"mmv {command} {invocation} has no help text"


def test_phantom_help_shows_the_defaults(capsys):
    text = " ".join(command_help(capsys, "phantom").split())
    for flag, value in (("--count", 200), ("--seed", 0), ("--ct-spacing", 4.0), ("--xray-spacing", 2.0)):
        assert re.search(rf"{flag} [A-Z_]+ [^-]*\(default: {value}\)", text), flag


def test_input_errors_are_one_line_without_a_traceback(tmp_path, capsys):
    assert main(["probe", str(tmp_path / "nope"), "--protocol", "manifest", "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("mmv probe: error:") and "nope" in error
    assert "Traceback" not in error


def test_pretrain_without_a_config_says_that_config_is_required(capsys):
    assert main(["pretrain"]) == 2
    error = capsys.readouterr().err
    assert "--config is required" in error and error.count("\n") == 1
    assert main(["pretrain", "--print-config"]) == 0  # the defaults need no config


def test_a_config_value_of_the_wrong_type_is_refused_naming_key_and_type(tmp_path, capsys):
    config = tmp_path / "run.toml"
    config.write_text('[model]\npreset = "vit_tiny"\n')
    assert main(["pretrain", "--config", str(config), "--set", "optim.lr=abc"]) == 2
    assert "optim.lr must be a number, got 'abc'" in capsys.readouterr().err


LIGHT_INVOCATIONS = (["--help"], ["pretrain", "--help"], ["phantom", "--help"])


@pytest.mark.parametrize("arguments", LIGHT_INVOCATIONS)
def test_help_imports_no_torch(arguments):
    # The command's help is printed by the package entry point; torch must not have been imported by then.
    probe = (
        "import runpy, sys\n"
        f"sys.argv = ['mmv', *{arguments!r}]\n"
        "try:\n"
        "    runpy.run_module('mmv', run_name='__main__')\n"
        "except SystemExit as stop:\n"
        "    assert stop.code == 0, stop.code\n"
        "print('torch imported' if 'torch' in sys.modules else 'torch not imported')\n"
    )
    completed = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    assert "usage: mmv" in completed.stdout
    assert completed.stdout.rstrip().endswith("torch not imported")


def test_package_entry_point_runs_the_command():
    completed = subprocess.run([sys.executable, "-m", "mmv", "--help"], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0
    for command in ("pretrain", "phantom", "demo", "embed", "probe", "analyze"):
        assert command in completed.stdout


def test_importing_mmv_is_light_and_its_names_load_on_first_use():
    probe = (
        "import sys\n"
        "import mmv\n"
        "assert 'torch' not in sys.modules\n"
        "from mmv import Encoder, pack\n"
        "import mmv.model, mmv.packing\n"
        "assert Encoder is mmv.model.Encoder and pack is mmv.packing.pack and mmv.ops.rope3d\n"
        "assert mmv.CheckpointError is mmv.model.CheckpointError\n"
        "assert set(mmv.__all__) <= set(dir(mmv))\n"
        "try:\n"
        "    mmv.NoSuchName\n"
        "except AttributeError as error:\n"
        "    assert 'NoSuchName' in str(error)\n"
        "else:\n"
        "    raise AssertionError('mmv.NoSuchName did not raise')\n"
        "print('ok')\n"
    )
    completed = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == "ok"


def test_every_public_name_of_mmv_resolves():
    import mmv

    for name in mmv.__all__:
        assert getattr(mmv, name) is not None, name
