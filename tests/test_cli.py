"""``fused-gates`` command line: every bad argument is an argparse error naming it (exit code 2), and no subcommand
runs the demo with the demo's options."""

from __future__ import annotations

import pytest

from fused_gates import cli


@pytest.mark.parametrize(("argv", "named"), [
    pytest.param(["plot-gates", "--taus", "0"], "--taus", id="plot-gates-tau-0"),
    pytest.param(["plot-gates", "--taus", "1", "-1"], "--taus", id="plot-gates-tau-negative"),
    pytest.param(["plot-gates", "--taus", "nan"], "--taus", id="plot-gates-tau-nan"),
    pytest.param(["plot-gates", "--taus", "inf"], "--taus", id="plot-gates-tau-inf"),
    pytest.param(["plot-gates", "--epsilon", "5"], "--epsilon", id="plot-gates-epsilon-5"),
    pytest.param(["plot-gates", "--epsilon", "0"], "--epsilon", id="plot-gates-epsilon-0"),
    pytest.param(["plot-gates", "--r-max", "0"], "--r-max", id="plot-gates-r-max-0"),
    pytest.param(["plot-gates", "--r-max", "0.5"], "--r-max", id="plot-gates-r-max-below-1"),
    pytest.param(["plot-gates", "--gates", "erf", "no_such_gate"], "--gates", id="plot-gates-unknown-gate"),
    pytest.param(["plot-gates", "--gate-module", "no_such_module_xyz"], "--gate-module", id="plot-gates-bad-module"),
    pytest.param(["demo", "--group-size", "3", "--batch", "4"], "--group-size", id="demo-group-not-dividing-batch"),
    pytest.param(["demo", "--vocab", "0"], "--vocab", id="demo-vocab-0"),
    pytest.param(["demo", "--group-size", "1"], "--group-size", id="demo-group-of-one"),
    pytest.param(["demo", "--batch", "-2"], "--batch", id="demo-negative-batch"),
    pytest.param(["demo", "--length", "0"], "--length", id="demo-length-0"),
    pytest.param(["demo", "--hidden-size", "x"], "--hidden-size", id="demo-hidden-not-a-number"),
    pytest.param(["demo", "--tau-pos", "0"], "--tau-pos", id="demo-tau-0"),
    pytest.param(["--vocab", "0"], "--vocab", id="no-subcommand-vocab-0"),
    pytest.param(["plot-runs", "somewhere", "--smooth", "0"], "--smooth", id="plot-runs-smooth-0"),
])
def test_bad_argument_exits_2_naming_it(argv, named, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert f"argument {named}" in capsys.readouterr().err


def test_no_subcommand_runs_the_demo_with_its_options(capsys) -> None:
    argv = ["--vocab", "64", "--hidden-size", "16", "--length", "8", "--batch", "4", "--group-size", "2",
            "--backend", "torch"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "lm_head: H=16, V=64" in out
    assert "4 completions x 8 tokens" in out


def test_demo_subcommand_and_its_default_gate(capsys) -> None:
    assert cli.main(["demo", "--vocab", "50", "--hidden-size", "8", "--length", "4", "--batch", "2",
                     "--group-size", "2", "--backend", "torch"]) == 0
    assert "gate=erf tau_pos=10.0 tau_neg=12.0" in capsys.readouterr().out


def test_help_is_the_main_help(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "plot-gates" in out and "plot-runs" in out


def test_the_core_command_line_imports_no_integration() -> None:
    """The core never imports the integrations (one direction of imports): ``evaluate`` is the application's."""
    import ast
    from pathlib import Path

    core = Path(cli.__file__).parent
    for path in sorted(core.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else (
                [alias.name for alias in node.names] if isinstance(node, ast.Import) else [])
            level = getattr(node, "level", 0)
            for name in names:
                assert "integrations" not in name.split("."), f"{path.name} imports {'.' * level}{name}"
