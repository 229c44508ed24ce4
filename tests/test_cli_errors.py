"""Command-line mistakes get one line, before anything trains: ``error: …`` on stderr naming the right
choice, exit status 2, no traceback, no run folder (issue 25, item 5); and ``--help`` shows the entry
point's own flags, where the config keys are and the method names."""

import os
import subprocess
import sys

import pytest

from experiments import table1
from experiments.configs import synthetic
from experiments.flags import check_comparison, check_config, unknown_override
from mcr_jax import names
from mcr_jax.report import DEFAULT_METHODS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = "--config=experiments/configs/synthetic.py:smoke"


def _cli(*args, timeout=300):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_closest_prefers_one_swap_and_refuses_far_names():
    # "mrc" is as close to "pmr" as to "mcr" by difflib's ratio; one swap of neighbours makes it "mcr".
    assert names.closest("mrc", ["pmr", "mcr", "mla"]) == "mcr"
    assert names.closest("synthtic", names.dataset_names()) == "synthetic"
    assert names.closest("qqq", names.method_names()) is None
    with pytest.raises(names.UnknownName, match=r"^unknown fusion head 'lineer'; did you mean 'linear'\? "):
        names.check_fusion("lineer")
    assert str(names.unknown("method", "qqq", ["a", "b"])) == "unknown method 'qqq'; methods: a, b"


def test_an_unknown_key_names_the_closest_key_or_lists_its_section():
    argv = ["main", SMOKE]
    assert (unknown_override(argv + ["--config.train.num_epoch=2"])
            == "unknown config key 'train.num_epoch'; did you mean 'train.num_epochs'?")
    assert (unknown_override(argv + ["--config.trian.num_epochs=2"])
            == "unknown config key 'trian.num_epochs'; did you mean 'train.num_epochs'?")
    message = unknown_override(argv + ["--config.method.lambda_m=0.1"])
    assert message.startswith("unknown config key 'method.lambda_m'; method has: ") and "mipd_weight" in message
    assert unknown_override(argv + ["--config.train.num_epochs=2"]) is None


def test_the_up_front_checks_pass_every_valid_label_and_table1_row_and_reject_a_bad_one():
    """The checks must not refuse what the library runs: every default comparison label, every row of
    every Table-1 block with its own options and settings."""
    config = synthetic.get_config("smoke")
    check_comparison(config, list(DEFAULT_METHODS))
    for dataset in table1.ROWS:
        rows = table1.table_rows(dataset)
        cfg = table1.dataset_config(dataset, smoke=False, manual_dir="", data_dir="")
        check_comparison(cfg, [r.label for r in rows], {r.label: r.overrides() for r in rows})
    with pytest.raises(ValueError, match=r"unknown method 'agm' options \['alpah'\]"):
        check_comparison(config, ["joint", "agm"], {"agm": {"method": {"alpah": 1.0}}})
    config.optim.learning_rate = -1.0
    with pytest.raises(ValueError, match="learning_rate"):
        check_config(config)


@pytest.mark.parametrize("flag, line", [
    ("--config.trian.num_epochs=2", "error: unknown config key 'trian.num_epochs'; did you mean 'train.num_epochs'?"),
    ("--config.method.name=mrc", "error: unknown method 'mrc'; did you mean 'mcr'? methods: agm, "),
    ("--config.data.name=synthtic", "error: unknown dataset 'synthtic'; did you mean 'synthetic'? datasets: "),
    ("--config.model.fusion=concat_mpl", "error: unknown fusion head 'concat_mpl'; did you mean 'concat_mlp'? "),
    ("--config.train.num_epochs=0", "error: train.num_epochs must be an integer >= 1; got 0."),
    ("--seeds=0,a", "error: flag --seeds=0,a: --seeds must be comma-separated integers"),
])
def test_a_mistake_is_one_line_exit_2_before_any_work(flag, line, tmp_path):
    out = _cli("-m", "experiments.main", SMOKE, f"--workdir={tmp_path / 'w'}", flag)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.count("\n") == 1 and out.stderr.startswith(line), out.stderr
    assert "Traceback" not in out.stderr and "method=mrc" not in out.stderr  # no rewritten --config quoted
    assert not (tmp_path / "w").exists()


def test_compare_rejects_a_method_before_the_first_run(tmp_path):
    out = _cli("-m", "experiments.compare", SMOKE, f"--workdir={tmp_path / 'w'}", "--methods=joint,mrc", "--seeds=0,1")
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.startswith("error: unknown method 'mrc'; did you mean 'mcr'?") and out.stderr.count("\n") == 1
    assert "epoch" not in out.stdout and not (tmp_path / "w").exists()


def test_reproduce_checks_every_study_up_front_and_passes_the_defaults():
    # In a fresh interpreter: the entry point defines its flags on import. Every study's MCR variants
    # are valid configs, and a wrong study name is refused naming the right one.
    code = ("import experiments.reproduce as r\n"
            "r.FLAGS(['reproduce', '--study=all'])\n"
            "r.check()\n"
            "try:\n"
            "    r.study_names('synthetic,sweep_u3')\n"
            "except ValueError as e:\n"
            "    print(e)\n")
    out = _cli("-c", code)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("unknown study 'sweep_u3'; did you mean 'sweep_u2'? studies (or all): synthetic, ")


def test_help_lists_the_entry_points_flags_the_config_keys_and_the_methods():
    out = _cli("-m", "experiments.main", "--help")
    for flag in ("--config:", "--workdir:", "--seeds:"):
        assert flag in out.stdout, out.stdout
    assert "Config keys: " in out.stdout and "experiments/configs/" in out.stdout
    assert "Methods (--config.method.name): " + ", ".join(names.method_names()) + "." in out.stdout
