"""The command line's method route: ``--config.method.name=<m>`` gives method m its own options."""

import json
import os
import subprocess
import sys

import pytest

from experiments.configs import ave, mfeat, synthetic
from experiments.flags import method_into_config_arg
from mcr_jax import data as data_lib
from mcr_jax.methods import METHODS, get_method, method_defaults

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_method_name_flag_becomes_the_config_argument():
    argv = ["main", "--config=experiments/configs/synthetic.py:smoke", "--config.method.name=ogm_ge", "--workdir=w"]
    assert method_into_config_arg(argv)[1] == "--config=experiments/configs/synthetic.py:smoke,method=ogm_ge"
    argv = ["main", "--config", "experiments/configs/mfeat.py", "--config.method.name", "agm"]
    assert method_into_config_arg(argv)[2] == "experiments/configs/mfeat.py:method=agm"
    assert method_into_config_arg(["main", "--config=a.py"]) == ["main", "--config=a.py"]


def test_importing_an_entry_point_leaves_argv_alone_and_parse_flags_routes_the_method():
    # A fresh interpreter: the entry point defines its flags on import (once per process).
    code = ("import sys, json\n"
            "argv = ['main', '--config', 'experiments/configs/synthetic.py:smoke', "
            "'--config.method.name', 'ogm_ge', '--config.method.alpha=0.3', '--workdir=w', 'extra']\n"
            "sys.argv = list(argv)\n"
            "import experiments.main\n"
            "from experiments.flags import FLAGS, parse_flags\n"
            "assert sys.argv == argv, sys.argv\n"
            "rest = parse_flags(argv)\n"
            "print(json.dumps([rest, FLAGS.config.method.name, FLAGS.config.method.alpha, FLAGS.workdir]))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [["main", "extra"], "ogm_ge", 0.3, "w"]


@pytest.mark.parametrize("name", sorted(set(METHODS) - {"uni_pre", "unimodal"}))
def test_every_method_gets_its_own_section_and_accepts_it(name):
    cfg = synthetic.get_config(f"smoke,method={name}")
    assert set(cfg.method) == {"name", *method_defaults(name)} and cfg.method.name == name
    get_method(cfg.method, data_lib.load(cfg.data).info)  # no unknown option, nothing missing


def test_dataset_specific_mcr_settings_only_reach_mcr():
    assert ave.get_config().method.mipd_weight == 0.01
    cfg = ave.get_config("method=mlb")
    assert dict(cfg.method) == {"name": "mlb", **method_defaults("mlb")}
    assert "num_permutations" not in mfeat.get_config("smoke,method=joint").method


SMOKE = "experiments/configs/synthetic.py:smoke"


def test_unimodal_and_a_baseline_option_from_the_command_line(tmp_path):
    """The README's route: a method other than MCR and one of its options, set on the command line;
    the run records only that method's options; ``--progress_every=0`` shows every epoch and
    ``--quiet`` none."""
    for name, extra, shown in (("unimodal", "--config.method.modality=x2", "--progress_every=0"),
                               ("ogm_ge", "--config.method.alpha=0.5", "--quiet")):
        workdir = tmp_path / name
        done = subprocess.run([sys.executable, "-m", "experiments.main", f"--config={SMOKE}",
                               f"--config.method.name={name}", extra, f"--workdir={workdir}", shown], cwd=ROOT,
                              check=True, capture_output=True, text=True)
        said = done.stdout.splitlines()
        if shown == "--quiet":  # no progress: the test results and where they are
            assert all(line.startswith(("test ", "results: ")) for line in said), said
            assert said[-1].startswith("results: "), said
        else:  # every epoch (the smoke config has 2), the summary, then the results
            assert [line.split("  ")[0] for line in said[:2]] == ["[unimodal x2 seed 0] epoch 1/2",
                                                                   "[unimodal x2 seed 0] epoch 2/2"], said
            assert said[2].startswith("[unimodal x2 seed 0] done in "), said
        with open(workdir / "results.json") as f:
            method = json.load(f)["config"]["method"]
        key, value = extra[len("--config.method."):].split("=")
        assert method["name"] == name and str(method[key]) == value
        assert set(method) == {"name", *method_defaults(name)}


def test_ctrl_c_is_one_line_naming_the_checkpointed_epoch_and_exit_130(tmp_path):
    # A fresh interpreter whose checkpoint writer raises KeyboardInterrupt (as Ctrl-C does) right
    # after saving epoch 2; the entry point must exit 130 with no traceback.
    code = ("import sys\n"
            "from mcr_jax.checkpoint import Checkpointer\n"
            "save = Checkpointer.save\n"
            "def save_then_interrupt(self, epoch, *a, **k):\n"
            "    save(self, epoch, *a, **k)\n"
            "    if epoch == 2:\n"
            "        raise KeyboardInterrupt\n"
            "Checkpointer.save = save_then_interrupt\n"
            "import experiments.main as m\n"
            "from experiments.flags import run\n"
            "sys.argv = ['main', '--config=experiments/configs/synthetic.py:smoke', '--config.train.num_epochs=4', "
            "'--config.train.checkpoint_every=1', '--config.parallel.num_devices=1', "
            f"'--workdir={tmp_path / 'w'}']\n"
            "run(m.main)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 130, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    assert "interrupted (the last checkpoint holds epoch 2); rerun the same command to resume." in out.stdout
    assert out.stderr.strip().splitlines()[-1].startswith("interrupted; finished epochs and runs are kept")
