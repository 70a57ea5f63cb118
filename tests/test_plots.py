"""Figure data: the gate curves against the paper's formulas (eqs. 1, 3, 6-8), run curves against hand-smoothed logs."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

from fused_gates import SOFT_GATES, cli, unregister_gate
from fused_gates.plots import (
    describe_gate,
    gate_curves,
    load_run,
    moving_average,
    off_policy_eur,
    render_gates,
    run_curves,
    run_label,
)

FIXTURES = Path(__file__).parent / "fixtures"
RUNS = FIXTURES / "runs"
TAUS = (1.0, 5.0, 10.0)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def paper_value(gate: str, r: float, tau: float) -> float:
    """The paper's f(r), written out independently of fused_gates.gates."""
    u = r - 1
    if gate == "sigmoid":  # eq. 3
        return 4 / tau / (1 + math.exp(-tau * u))
    if gate == "erf":  # eq. 6
        c = math.sqrt(math.pi / (2 * tau**2))
        return c * (1 + math.erf(tau * u / math.sqrt(2))) + 1 - c
    if gate == "arctan":  # eq. 7
        return 1 + math.atan(tau * u) / tau
    return 1 + u / math.sqrt(1 + tau**2 * u**2)  # softsign, eq. 8


def paper_derivative(gate: str, r: float, tau: float) -> float:
    u = r - 1
    if gate == "sigmoid":  # eq. 5 with f = 4 s / tau: 4 s (1 - s)
        s = 1 / (1 + math.exp(-tau * u))
        return 4 * s * (1 - s)
    if gate == "erf":
        return math.exp(-(tau**2) * u**2 / 2)
    if gate == "arctan":
        return 1 / (1 + tau**2 * u**2)
    return (1 + tau**2 * u**2) ** -1.5


@pytest.fixture(scope="module")
def curves():
    return gate_curves(taus=TAUS)


# ----------------------------------------------------------------------------------------------------------------------
# Figure 1


def test_every_builtin_gate_is_plotted_by_default(curves) -> None:
    assert {"clip", *SOFT_GATES} <= set(curves)
    for gate in SOFT_GATES:
        assert [curve.label for curve in curves[gate]] == ["tau = 1", "tau = 5", "tau = 10"]


def test_ratio_grid_covers_zero_to_three_and_contains_one(curves) -> None:
    ratio = curves["erf"][0].ratio
    assert 0 < ratio[0] <= 0.01
    assert ratio[-1] == 3.0
    assert 1.0 in ratio
    assert ratio == sorted(ratio)


@pytest.mark.parametrize("gate", SOFT_GATES)
def test_soft_gate_derivative_peaks_at_one_with_value_one(curves, gate: str) -> None:
    for tau, curve in zip(TAUS, curves[gate], strict=True):
        value, derivative = curve.at(1.0)
        assert derivative == pytest.approx(1.0, abs=1e-12)
        assert max(curve.derivative) == pytest.approx(1.0, abs=1e-12)
        # The paper's sigmoid gate passes through (1, 2 / tau); the others are normalised through (1, 1).
        assert value == pytest.approx(2 / tau if gate == "sigmoid" else 1.0, abs=1e-12)


@pytest.mark.parametrize("gate", SOFT_GATES)
def test_soft_gate_curves_follow_the_papers_formulas(curves, gate: str) -> None:
    for tau, curve in zip(TAUS, curves[gate], strict=True):
        for index in range(0, len(curve.ratio), 37):  # a spread of grid points
            r = curve.ratio[index]
            assert curve.value[index] == pytest.approx(paper_value(gate, r, tau), rel=1e-9, abs=1e-12)
            assert curve.derivative[index] == pytest.approx(paper_derivative(gate, r, tau), rel=1e-9, abs=1e-12)


def test_clip_is_piecewise_linear_per_advantage_sign(curves) -> None:
    positive, negative = curves["clip"]
    assert positive.label.startswith("A > 0") and negative.label.startswith("A < 0")
    for index, r in enumerate(positive.ratio):
        assert positive.value[index] == pytest.approx(min(r, 1.2))
        assert positive.derivative[index] == (1.0 if r <= 1.2 else 0.0)
        assert negative.value[index] == pytest.approx(max(r, 0.8))
        assert negative.derivative[index] == (1.0 if r >= 0.8 else 0.0)


def test_render_gates_writes_a_png(curves, tmp_path: Path) -> None:
    path = render_gates({name: curves[name] for name in ("clip", "erf")}, tmp_path / "gates.png", dpi=40)
    assert path.read_bytes()[:8] == PNG_MAGIC


CUSTOM_GATE_MODULE = '''
import torch
from fused_gates import register_gate

# f'(r) = (1 + x^2)^-2 with x = tau (r - 1); f is its antiderivative through (1, 1).
register_gate(
    "cauchy2_plot_test",
    value=lambda r, tau: 1 + ((tau * (r - 1)) / (1 + (tau * (r - 1)) ** 2) + torch.atan(tau * (r - 1))) / (2 * tau),
    derivative=lambda r, tau: (1 + (tau * (r - 1)) ** 2) ** -2,
)
'''


def test_plot_gates_command_imports_a_module_registering_a_gate(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "my_gates_for_plot.py").write_text(CUSTOM_GATE_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "figure.png"
    try:
        argv = ["plot-gates", "--gate-module", "my_gates_for_plot", "--gates", "clip", "cauchy2_plot_test",
                "--taus", "1", "5", "--out", str(out)]
        assert cli.main(argv) == 0
        curve = gate_curves(["cauchy2_plot_test"], taus=[5.0])["cauchy2_plot_test"][0]
        assert curve.at(1.0) == pytest.approx((1.0, 1.0))
    finally:
        unregister_gate("cauchy2_plot_test")
        sys.modules.pop("my_gates_for_plot", None)
    assert out.read_bytes()[:8] == PNG_MAGIC


# ----------------------------------------------------------------------------------------------------------------------
# Runs


@pytest.mark.parametrize(("values", "window", "expected"), [
    pytest.param([1.0, 2.0, 3.0, 4.0], 1, [1.0, 2.0, 3.0, 4.0], id="window-1-is-identity"),
    pytest.param([1.0, 2.0, 3.0, 4.0], 2, [1.0, 1.5, 2.5, 3.5], id="window-2"),
    pytest.param([0.0, 3.0, 6.0, 3.0], 3, [0.0, 1.5, 3.0, 4.0], id="window-3-short-start"),
])
def test_moving_average_is_trailing(values, window, expected) -> None:
    assert moving_average(values, window) == pytest.approx(expected)


def test_run_label_comes_from_the_run_config_else_the_folder_name() -> None:
    assert run_label(RUNS / "erf-run") == "erf (tau+ 10, tau- 12)"
    assert run_label(RUNS / "clip-trl") == "clip-trl"


def test_smoothed_curves_of_a_metrics_csv_match_a_hand_computation() -> None:
    curves = run_curves([load_run(RUNS / "erf-run")], window=2)
    reward, entropy, eur = curves["reward"][0], curves["entropy"][0], curves["EUR"][0]
    assert reward.label == "erf (tau+ 10, tau- 12)"
    # rewards are logged on fresh batches only (steps 1, 3, 5): 0.0, 0.2, 0.6
    assert reward.step == [1, 3, 5]
    assert reward.y == pytest.approx([0.0, 0.1, 0.4])
    assert entropy.step == [1, 2, 3, 4, 5, 6]
    assert entropy.y == pytest.approx([3.0, 2.95, 2.85, 2.75, 2.65, 2.55])
    # on-policy steps (every ratio exactly 1) leave EUR out: steps 2, 4, 6 with 0.5, 0.7, 0.9
    assert eur.step == [2, 4, 6]
    assert eur.y == pytest.approx([0.5, 0.6, 0.8])


def test_trainer_state_log_history_is_read_without_the_summary_entry() -> None:
    run = load_run(RUNS / "clip-trl")
    assert [row["step"] for row in run.rows] == [1, 2]
    reward = run_curves([run], window=2)["reward"][0]
    assert reward.y == pytest.approx([0.25, 0.5])


def test_plot_runs_command_writes_a_png(tmp_path: Path, capsys) -> None:
    out = tmp_path / "runs.png"
    argv = ["plot-runs", str(RUNS / "erf-run"), str(RUNS / "clip-trl"), "--smooth", "2", "--out", str(out)]
    assert cli.main(argv) == 0
    assert out.read_bytes()[:8] == PNG_MAGIC
    assert "erf (tau+ 10, tau- 12); clip-trl" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------------------------
# Off-policy EUR and labels


@pytest.mark.parametrize(("row", "expected"), [
    pytest.param({"eur": 0.9, "eur/off_policy": 0.7, "eur/on_policy": 1.0}, 0.7, id="split-logged"),
    pytest.param({"eur": 1.0, "eur/on_policy": 1.0}, None, id="split-logged-on-policy-only"),
    pytest.param({"eur": 0.8, "ratio/min": 0.9, "ratio/max": 1.1}, 0.8, id="unsplit-off-policy"),
    pytest.param({"eur": 1.0, "ratio/min": 1.0, "ratio/max": 1.0}, None, id="unsplit-on-policy"),
    pytest.param({"eur": math.nan, "ratio/min": 0.9, "ratio/max": 1.1}, None, id="nan"),
    pytest.param({"entropy": 2.0}, None, id="not-logged"),
])
def test_off_policy_eur_of_a_logged_step(row, expected) -> None:
    assert off_policy_eur(row) == expected


def test_adaptive_runs_are_labelled_as_such() -> None:
    settings = {"gate": "erf", "tau_pos": 10.0, "tau_neg": 12.0, "eur_target": 0.8}
    assert describe_gate(settings) == "erf (tau+ 10, tau- 12, adapted to EUR 0.8)"
    assert describe_gate({**settings, "eur_target": None}) == "erf (tau+ 10, tau- 12)"


# ----------------------------------------------------------------------------------------------------------------------
# Toy study summary (docs/toy-study)


def test_toy_study_summary_matches_a_hand_computed_table() -> None:
    from fused_gates.integrations.app.toy_study import format_summary, paired_with, read_rows, summarise

    rows = read_rows(FIXTURES / "toy_runs.csv")
    options = {"final_window": 2, "threshold": 0.5, "smooth": 2}
    clip, erf = summarise(rows, **options)
    # clip, per seed: final answer reward (last 2 logged) 0.6 / 0.3; answer MA-2 0.2, 0.3, 0.6 reaches 0.5 at step 5,
    # seed 1 (0, 0.1, 0.3) never; off-policy EUR 0.95 / 0.8, last third (steps > 4) 1.0 / 0.8; entropy 2.55 / 2.0
    assert (clip.gate, clip.seeds, clip.reached) == ("clip", 2, 1)
    assert (clip.final_answer.mean, clip.final_answer.std) == pytest.approx((0.45, 0.2121320))
    assert clip.steps_to_threshold.mean == 5.0 and math.isnan(clip.steps_to_threshold.std)
    assert (clip.eur.mean, clip.eur.std) == pytest.approx((0.875, 0.1060660))
    assert (clip.eur_last_third.mean, clip.eur_last_third.std) == pytest.approx((0.9, 0.1414214))
    assert (clip.final_entropy.mean, clip.final_entropy.std) == pytest.approx((2.275, 0.3889087))
    # erf: both seeds end at 0.8, reach 0.5 at steps 3 and 5
    assert (erf.reached, erf.steps_to_threshold.mean) == (2, 4.0)
    assert (erf.final_answer.mean, erf.eur.mean, erf.eur_last_third.mean) == pytest.approx((0.8, 0.6, 0.65))
    paired = paired_with(clip, erf)
    assert paired.answer_differences == pytest.approx((0.2, 0.5))
    assert (paired.answer_ahead, paired.answer_behind) == (2, 0)
    # seed 0: 3 - 5 steps; seed 1: erf reaches the threshold, clip never (faster, no difference to average)
    assert paired.step_differences == (-2.0,) and (paired.faster, paired.slower) == (2, 0)
    lines = format_summary([clip, erf], **options).splitlines()
    assert lines[2:4] == [
        "| clip | 2 | 0.450 ± 0.212 | 5.0 | 1/2 | 0.875 ± 0.106 | 0.900 ± 0.141 | 2.275 ± 0.389 |",
        "| erf | 2 | 0.800 ± 0.000 | 4.0 ± 1.4 | 2/2 | 0.600 ± 0.141 | 0.650 ± 0.212 | 2.000 ± 1.414 |",
    ]
    assert lines[-1] == "| erf | +0.20 +0.50 | +0.350 ± 0.212 | 2 / 0 | -2.0 | 2 / 0 |"


def test_toy_study_rows_keep_only_the_off_policy_eur() -> None:
    from fused_gates.integrations.app.toy_study import collect_rows

    rows = collect_rows([("erf", 0, RUNS / "erf-run")])
    assert [row["step"] for row in rows] == [1, 2, 3, 4, 5, 6]
    assert [row["eur_off_policy"] for row in rows][1::2] == [0.5, 0.7, 0.9]
    assert all(math.isnan(row["eur_off_policy"]) for row in rows[::2])
    assert all(math.isnan(row["tau_pos"]) for row in rows)  # fixed temperatures: not logged
    assert rows[4]["format_reward"] == 0.5


def test_toy_study_figures_are_pngs(tmp_path: Path) -> None:
    from fused_gates.integrations.app.toy_study import read_rows, summarise, write_curves, write_paired

    rows = read_rows(FIXTURES / "toy_runs.csv")
    assert write_curves(rows, tmp_path / "curves.png", smooth=2, labels={}).read_bytes()[:8] == PNG_MAGIC
    assert write_paired(summarise(rows), tmp_path / "paired.png").read_bytes()[:8] == PNG_MAGIC


def test_adaptive_run_curves_use_the_logged_off_policy_eur_and_add_the_temperature() -> None:
    fixed, adaptive = load_run(RUNS / "erf-run"), load_run(RUNS / "erf-adaptive")
    assert adaptive.label == "erf (tau+ 10, tau- 12, adapted to EUR 0.8)"
    curves = run_curves([fixed, adaptive])
    assert list(curves) == ["reward", "entropy", "EUR", "gate tau_pos (adaptive)"]
    eur = {curve.label: curve for curve in curves["EUR"]}[adaptive.label]
    assert eur.step == [2, 4] and eur.y == pytest.approx([0.7, 0.9])  # eur/off_policy, never the on-policy 1.0
    assert [curve.label for curve in curves["gate tau_pos (adaptive)"]] == [adaptive.label]
    assert list(run_curves([fixed])) == ["reward", "entropy", "EUR"]


def test_toy_study_append_keeps_the_other_runs_and_replaces_the_redone_ones() -> None:
    from fused_gates.integrations.app.toy_study import merge_rows, read_rows

    kept = read_rows(FIXTURES / "toy_runs.csv")  # clip and erf, seeds 0 and 1
    new = [{**row, "gate": "dppo"} for row in kept if row["gate"] == "clip"]
    redone = [{**row, "answer_reward": 0.125} for row in kept if row["gate"] == "erf" and row["seed"] == 1]
    merged = merge_rows(kept, [*new, *redone])
    assert list(dict.fromkeys(str(row["gate"]) for row in merged)) == ["clip", "erf", "dppo"]
    assert [row for row in merged if row["gate"] in ("clip", "dppo")] == [
        *(row for row in kept if row["gate"] == "clip"), *new]
    assert [row for row in merged if row["gate"] == "erf"] == [
        *(row for row in kept if row["gate"] == "erf" and row["seed"] == 0), *redone]


@pytest.mark.parametrize(("flags", "named"), [
    pytest.param(["--append", "--summarise-only"], "--summarise-only runs none", id="append-summarise-only"),
    pytest.param(["--append", "--gates", "dppo"], "no ", id="append-without-runs-csv"),
])
def test_toy_study_append_is_refused_where_it_has_nothing_to_do(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], named: str) -> None:
    from fused_gates.integrations.app.toy_study import main

    with pytest.raises(SystemExit) as exit_info:
        main([*flags, "--out", str(tmp_path), "--runs-dir", str(tmp_path / "runs")])
    assert exit_info.value.code == 2
    assert named in capsys.readouterr().err


@pytest.mark.parametrize(("gate", "option"), [
    pytest.param("dppo", "dppo_delta", id="dppo"),
    pytest.param("m2po", "m2po_threshold", id="m2po"),
    pytest.param("bapo", "bapo_rho", id="bapo"),
    pytest.param("aspo", "aspo_dual_clip", id="aspo"),
    pytest.param("gmpo", "gmpo_epsilon", id="gmpo"),
])
def test_gates_reading_more_than_the_ratio_are_labelled_by_their_options_not_temperatures(gate: str,
                                                                                         option: str) -> None:
    settings = {"gate": gate, "tau_pos": 10.0, "tau_neg": 12.0, "epsilon": 0.2, option: None}  # the script's defaults
    assert describe_gate(settings) == f"{gate} (paper defaults)"
    assert describe_gate({**settings, option: 0.3}) == f"{gate} ({option} 0.3)"


def test_gate_inside_the_entropy_scaled_region_is_labelled_with_its_threshold() -> None:
    settings = {"gate": "clip", "epsilon": 0.2, "estr_threshold": None, "estr_epsilon": None}
    assert describe_gate(settings) == "clip (eps 0.2)"
    assert describe_gate({**settings, "estr_threshold": 0.04}) == "clip (eps 0.2) in ESTR (tau 0.04)"
    assert describe_gate({"gate": "sigmoid", "tau_pos": 10.0, "tau_neg": 12.0, "estr_threshold": 0.5,
                          "estr_epsilon": 0.02}) == "sigmoid (tau+ 10, tau- 12) in ESTR (tau 0.5, eps 0.02)"
