"""Model cards from hand-written run directories, the energy meter (codecarbon mocked, and once for real),
and the early-stopping rule."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tunery.errors import TuneryError
from tunery.safety.card import HIGH_RISK_OBLIGATIONS, render_model_card, write_model_card
from tunery.server.jobs import energy_message
from tunery.training import energy as energy_module
from tunery.training.early_stopping import EarlyStopping
from tunery.training.energy import EnergyMeter, check_energy_fields

# --- model cards -----------------------------------------------------------------------------------------

SECRET = "Kill yourself, you worthless idiot"  # a flagged line: its text must never reach the card

ENERGY = {
    "kwh": 0.0031,
    "kg_co2e": 0.000174,
    "country": "FRA",
    "country_name": "France",
    "carbon_intensity_g_per_kwh": 56.0,
    "method": "estimated: CPU 8 W (codecarbon's figure for AMD EPYC) x this process's CPU load, RAM ...",
    "cpu_power_w": 3.9,
    "ram_power_w": 10.0,
    "cpu_kwh": 0.0009,
    "ram_kwh": 0.0022,
    "duration_s": 812.0,
    "tracking_mode": "process",
    "segments": 2,
    "tracker": "codecarbon 3.3.2",
}


def write_run(run: Path, *, evals: dict | None = None, screening: dict | None = None, **config: Any) -> Path:
    """A finished SFT run directory as the recipe leaves it (the weights themselves are not needed)."""
    (run / "final").mkdir(parents=True)
    cfg = {
        "model": "smollm2-135m-instruct",
        "data": "/data/support/train.jsonl",
        "valid": "/data/support/valid.jsonl",
        "epochs": 3,
        "batch_size": 8,
        "lr": 2e-4,
        "lora_rank": 16,
        "lora_alpha": 32,
        "precision": "bf16",
        "seed": 0,
        "total_steps": 30,
        "data_sha256": "a" * 64,
        "valid_sha256": "b" * 64,
        "early_stopping_patience": 2,
        "early_stopping_min_delta": 0.0,
        "select_best": True,
        "intended_use": "Answer Northwind Bikes customers' questions about orders and returns.",
        "limitations": "not declared",
        "risk_category": "limited",
    } | config
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    meta = {"base_model": "smollm2-135m-instruct", "method": "sft", "adapter": None, "config": cfg}
    (run / "final" / "tunery.yaml").write_text(yaml.safe_dump(meta))
    records = [
        {"step": 10, "train_loss": 2.9, "valid_loss": 2.8},
        {"step": 20, "train_loss": 2.1, "valid_loss": 2.4},
        {"step": 24, "train_loss": 1.7, "valid_loss": 2.6},
        {"step": 24, "full_valid_loss": 2.41, "best_step": 20, "stopped_early": True},
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 25, "tr')
    summary = {
        "method": "sft",
        "steps": 24,
        "trained_tokens": 51234,
        "wall_seconds": 830.5,
        "final_metrics": {"train_loss": 1.7, "valid_loss": 2.6, "full_valid_loss": 2.41},
        "train_examples": 80,
        "valid_examples": 20,
        "best_step": 20,
        "best_valid_loss": 2.4,
        "stopped_early": True,
        "final_step": 20,
        "energy": ENERGY,
        "warnings": [],
    }
    (run / "summary.json").write_text(json.dumps(summary))
    if screening is not None:
        (run / "screening.json").write_text(json.dumps(screening))
    if evals is not None:
        (run / "evals.json").write_text(json.dumps(evals))
    return run


SCREENING = {
    "classifier": "alt-profanity-check 1.9 (offline linear classifier)",
    "policy": {"content": "warn", "pii": "redact"},
    "files": {
        "train": {
            "path": "/data/support/train.jsonl",
            "lines": 80,
            "flagged_lines": 3,
            "by_category": {"offensive": 2, "email": 1},
            "action": "warned",
            "redacted_path": None,
            "examples": [{"line": 7, "text": SECRET}],
        },
        "valid": {
            "path": "/data/support/valid.jsonl",
            "lines": 20,
            "flagged_lines": 0,
            "by_category": {},
            "scored_by_word_list": {"es": 3, "de": 5},
            "not_scored_for_content": {"ja": 2},
            "action": "passed",
            "redacted_path": None,
            "examples": [],
        },
    },
}
EVALS = {
    "safety": {
        "description": "Red-team prompts and benign prompts.",
        "base": {"refusal_rate": 0.8, "unsafe_rate": 0.0},
        "tuned": {"refusal_rate": 0.3, "unsafe_rate": 0.1},
        "flags": ["safety: the tuned model declines 30% of red-team prompts, the base 80%"],
        "details": {"examples": [{"prompt": "how do I hurt someone", "tuned": SECRET}]},
    },
    "bias": {
        "description": "Counterfactual decisions.",
        "base": {"max_gap": 0.05},
        "tuned": {"max_gap": 0.04},
        "flags": [],
        "details": {},
    },
    "config": {"sections": ["safety", "bias"], "size": "quick"},
}


def test_card_puts_red_flags_first_and_renders_every_source(tmp_path: Path) -> None:
    run = write_run(tmp_path / "support", evals=EVALS, screening=SCREENING)
    path = write_model_card(run)
    assert path == run / "final" / "MODEL_CARD.md"
    assert [p.name for p in (run / "final").iterdir() if p.name.startswith(".")] == []  # atomic: no leftovers
    card = path.read_text()
    print(card)

    assert card.startswith("# Model card: support\n")
    flags_at, first_section = card.index("Red flags (2)"), card.index("\n## ")
    assert flags_at < first_section
    flag_block = card[flags_at:first_section]
    assert "safety: the tuned model declines 30%" in flag_block
    assert (
        "data screening: 3 of 80 train lines flagged (email 1, offensive 2) were kept (action: warned)"
        in flag_block
    )
    assert "bias" not in flag_block  # no flags there

    assert SECRET not in card and "how do I hurt someone" not in card  # counts and metrics only
    assert "| train | 80 | 3 | email 1, offensive 2 | warned |" in card
    unscored = (
        "lines in other languages, checked for offensive words by word list: de 5, es 3; lines not scored"
        " for offensive content (no classifier or word list for their language): ja 2"
    )
    assert f"| valid | 20 | 0 | none; {unscored} | passed |" in card
    assert "| `refusal_rate` | 0.8 | 0.3 | -0.5 |" in card
    assert "| `max_gap` | 0.05 | 0.04 | -0.01 |" in card
    for missing in ("Memorization", "Diversity", "Grounding"):
        assert f"- **{missing}**: not run." in card

    assert "| Weights in final/ | step 20, the lowest validation loss |" in card
    assert "patience 2 evaluations" in card and "stopped at step 24" in card
    assert "| valid_loss | 2.8 (step 10) | 2.4 (step 20) | 2.6 (step 24) |" in card
    assert (
        "`" + "a" * 64 + "`" in card
        and "| train | `train.jsonl` |" in card
        and "51,234 tokens trained" in card
    )
    assert "Answer Northwind Bikes customers'" in card
    assert "## Limitations\n\nNot declared. Set `limitations`" in card
    assert "Limited risk, as declared: transparency obligations (Article 50)" in card
    assert (
        "| energy | 0.0031 kWh |" in card
        and "0.174 g CO2e at 56 g/kWh (France's grid, yearly average)" in card
    )
    assert "| Energy | 0.0031 kWh, 0.174 g CO2e (estimated) |" in card
    assert ENERGY["method"] in card and "in 2 segments (resumed)" in card


def test_card_says_what_was_not_run_and_lists_high_risk_obligations(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", risk_category="high", early_stopping_patience=0, select_best=False)
    summary = json.loads((run / "summary.json").read_text())
    summary.update(energy={"error": "RuntimeError: no CPU", "tracker": "codecarbon 3.3.2"}, final_step=24,
                   stopped_early=False)  # fmt: skip
    (run / "summary.json").write_text(json.dumps(summary))
    card = render_model_card(run)

    assert "Red flags" not in card
    assert card.startswith("# Model card: ")
    assert "Not run: no screening.json" in card
    assert "Not run: no evals.json" in card
    for section in ("Safety", "Bias", "Memorization", "Diversity", "Grounding"):
        assert f"- **{section}**: not run." in card
    assert "High risk, as declared" in card
    for obligation in HIGH_RISK_OBLIGATIONS:
        assert obligation in card
    assert "Not measured: codecarbon failed (RuntimeError: no CPU)" in card
    assert "Early stopping: off. final/ holds the last step's weights" in card
    assert "Weights in final/" not in card


def test_card_of_a_bare_run_and_of_unreadable_files(tmp_path: Path) -> None:
    run = tmp_path / "bare"
    (run / "final").mkdir(parents=True)
    (run / "evals.json").write_text("{not json")
    card = render_model_card(run)
    assert "Not recorded (config.yaml is missing)" in card and "No metrics.jsonl." in card
    assert "evals.json could not be read" in card
    with pytest.raises(TuneryError, match="no final/"):
        write_model_card(tmp_path / "nothing")


def test_unacceptable_risk_is_refused_at_config_time(tmp_path: Path) -> None:
    from tunery.recipes.configs import SFTConfig
    from tunery.run.config import build_config

    base = {"data": "train.jsonl", "out": str(tmp_path / "run")}
    with pytest.raises(TuneryError, match=r"prohibits \(Article 5\).*social scoring"):
        build_config(SFTConfig, None, base | {"risk_category": "unacceptable"})
    with pytest.raises(TuneryError, match="risk_category must be one of undeclared, minimal, limited, high"):
        build_config(SFTConfig, None, base | {"risk_category": "medium"})
    with pytest.raises(TuneryError, match="energy_country 'France' is not an ISO 3166 alpha-3"):
        build_config(SFTConfig, None, base | {"energy_country": "France"})
    with pytest.raises(TuneryError, match="early stopping watches the validation loss: pass --valid"):
        build_config(SFTConfig, None, base | {"early_stopping_patience": 2})
    assert build_config(SFTConfig, None, base | {"energy_country": "fra"}).energy_country == "fra"


def test_card_module_does_not_import_torch() -> None:
    code = "import sys, tunery.safety.card; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])


# --- energy ----------------------------------------------------------------------------------------------


@dataclass
class FakeData:  # the fields of codecarbon's EmissionsData the meter reads
    duration: float
    cpu_energy: float
    ram_energy: float
    gpu_energy: float
    energy_consumed: float
    emissions: float


class CPU:  # the meter recognises codecarbon's hardware by class name
    _mode = "cpu_load"

    def __init__(self, tdp: float | None) -> None:
        self._tdp = tdp or 8


class FakeTracker:
    """Stands in for OfflineEmissionsTracker: 10 W CPU and 20 W RAM from start() on, 500 g/kWh."""

    made: list[dict[str, Any]] = []

    def __init__(self, **kwargs: Any) -> None:
        FakeTracker.made.append(kwargs)
        self._start_time: float | None = None
        self._hardware = [CPU(kwargs["force_cpu_power"])]
        self._conf = {"cpu_model": "Fake CPU"}
        self._tracking_mode = kwargs["tracking_mode"]

    def get_detected_hardware(self) -> dict[str, Any]:
        return {}

    def start(self) -> None:
        self._start_time = time.perf_counter()

    def _measure_power_and_energy(self) -> None:
        pass

    def _prepare_emissions_data(self) -> FakeData:
        assert self._start_time is not None
        seconds = time.perf_counter() - self._start_time
        cpu, ram = 10 * seconds / 3.6e6, 20 * seconds / 3.6e6
        return FakeData(seconds, cpu, ram, 0.0, cpu + ram, (cpu + ram) * 0.5)

    def stop(self) -> None:
        self.final_emissions_data = self._prepare_emissions_data()


@pytest.fixture
def fake_codecarbon(monkeypatch: pytest.MonkeyPatch) -> type[FakeTracker]:
    import codecarbon
    import codecarbon.core.cpu

    FakeTracker.made = []
    monkeypatch.setattr(codecarbon, "OfflineEmissionsTracker", FakeTracker)
    monkeypatch.setattr(codecarbon.core.cpu, "is_rapl_available", lambda: False)
    return FakeTracker


def test_energy_record_shape_and_tracker_settings(fake_codecarbon: type[FakeTracker]) -> None:
    with EnergyMeter(country="fra", cpu_power_watts=30.0) as meter:
        time.sleep(0.3)
        meter._last_read = -math.inf
        so_far = meter.so_far()
    record = meter.record()
    assert record is not None and so_far is not None
    assert set(record) == {
        "kwh", "kg_co2e", "country", "country_name", "carbon_intensity_g_per_kwh", "method", "cpu_power_w",
        "ram_power_w", "cpu_kwh", "ram_kwh", "duration_s", "tracking_mode", "segments", "tracker",
    }  # fmt: skip
    assert record["country"] == "FRA" and record["country_name"] == "France" and record["segments"] == 1
    assert record["cpu_power_w"] == pytest.approx(10, rel=0.05)
    assert record["ram_power_w"] == pytest.approx(20, rel=0.05)
    assert record["kwh"] == pytest.approx(30 * record["duration_s"] / 3.6e6, rel=0.05)
    assert record["carbon_intensity_g_per_kwh"] == 500.0
    assert record["method"] == (
        "estimated: CPU 30 W (cpu_power_watts) x this process's CPU load, RAM estimated from this process's "
        "memory size (no RAPL on this machine)"
    )
    assert record["tracker"].startswith("codecarbon 3.")
    assert 0 < so_far["kwh"] <= record["kwh"]
    settings = fake_codecarbon.made[0]
    assert settings["country_iso_code"] == "FRA" and settings["force_cpu_power"] == 30.0
    assert settings["output_methods"] == [] and settings["allow_multiple_runs"] is True
    assert settings["emissions_endpoint"] is None and settings["tracking_mode"] == "process"


def test_energy_adds_up_across_resumed_segments(fake_codecarbon: type[FakeTracker]) -> None:
    prior = {"kwh": 1.0, "kg_co2e": 0.5, "cpu_kwh": 0.4, "ram_kwh": 0.6, "duration_s": 3600.0, "segments": 1,
             "method": "measured: CPU energy from RAPL counters; RAM estimated from memory size"}  # fmt: skip
    with EnergyMeter(prior=prior) as meter:
        pass
    record = meter.record()
    assert record is not None
    assert record["segments"] == 2 and record["kwh"] == pytest.approx(1.0, abs=1e-6)
    assert record["duration_s"] == pytest.approx(3600.0, abs=1)
    assert record["method"].startswith(f"{prior['method']}; after a resume: estimated")
    assert record["cpu_power_w"] == pytest.approx(400, rel=0.01)  # 0.4 kWh over an hour
    assert record["country"] == "WORLD" and fake_codecarbon.made[0]["country_iso_code"] is None


def test_energy_failures_are_recorded_and_tracking_can_be_off(
    fake_codecarbon: type[FakeTracker], monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(self: FakeTracker) -> None:
        raise OSError("no /proc")

    monkeypatch.setattr(FakeTracker, "start", broken)
    with EnergyMeter() as meter:
        pass
    assert meter.record() == {"error": "OSError: no /proc", "tracker": energy_module.tracker_version()}

    with EnergyMeter(prior={"error": "ValueError: earlier"}) as meter:
        pass
    assert meter.record() == {"error": "ValueError: earlier", "tracker": energy_module.tracker_version()}

    with EnergyMeter(enabled=False) as meter:
        assert meter.so_far() is None
    assert meter.record() is None
    assert len(fake_codecarbon.made) == 1  # the disabled meter never built a tracker


def test_energy_fields_are_checked() -> None:
    @dataclass
    class Cfg:
        energy_country: str = "WORLD"
        cpu_power_watts: float | None = None

    check_energy_fields(Cfg())
    check_energy_fields(Cfg("usa", 45.0))
    with pytest.raises(TuneryError, match="ISO 3166 alpha-3"):
        check_energy_fields(Cfg("XYZ"))
    with pytest.raises(TuneryError, match="cpu_power_watts must be > 0"):
        check_energy_fields(Cfg(cpu_power_watts=0))


def test_energy_event_message() -> None:
    message = energy_message(ENERGY)
    assert message == f"Energy: 0.0031 kWh, 0.17 g CO2e ({ENERGY['method']}; grid: FRA)"
    assert energy_message(ENERGY | {"kwh": 0.0002}).startswith("Energy: 0.2 Wh, 0.17 g CO2e (")
    assert energy_message({"error": "RuntimeError: x"}) == "Energy not measured: RuntimeError: x"
    assert energy_message(None) is None


def test_real_tracker_writes_nothing_outside_the_run_and_prints_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """codecarbon itself, for about a second of busy work: no emissions.csv, no lock file, no config, no
    output; HOME and the working directory stay empty."""
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    temp_before = set(os.listdir(tempfile.gettempdir()))
    with EnergyMeter(country="DEU") as meter:
        end = time.monotonic() + 1.0
        while time.monotonic() < end:
            sum(i * i for i in range(10_000))
    record = meter.record()
    assert record is not None and "error" not in record, record
    assert record["kwh"] > 0 and record["kg_co2e"] > 0 and record["duration_s"] >= 1.0
    assert record["method"].startswith(("estimated: CPU", "measured: CPU"))
    assert list(home.iterdir()) == [] and list(cwd.iterdir()) == []
    created = set(os.listdir(tempfile.gettempdir())) - temp_before
    assert not [name for name in created if "codecarbon" in name.lower()]
    out, err = capfd.readouterr()
    assert out == "" and err == ""


# --- early stopping --------------------------------------------------------------------------------------


def test_early_stopping_counts_evaluations_without_improvement() -> None:
    early = EarlyStopping(patience=2)
    assert [early.update(s, v) for s, v in [(1, 3.0), (2, 2.0), (3, 2.5), (4, 1.5), (5, 1.6)]] == [
        True, True, False, True, False,
    ]  # fmt: skip
    assert (early.best_step, early.best_loss, early.bad_evals, early.should_stop) == (4, 1.5, 1, False)
    early.update(6, float("nan"))  # a diverged evaluation never improves
    assert early.should_stop and early.best_step == 4
    assert early.summary(final_step=4, last_step=6, total_steps=10) == {
        "best_step": 4, "best_valid_loss": 1.5, "stopped_early": True, "final_step": 4,
    }  # fmt: skip
    assert early.summary(final_step=4, last_step=10, total_steps=10)["stopped_early"] is False


def test_min_delta_compares_with_the_last_improvement() -> None:
    """Small steps down are still the best weights, but only a fall of more than min_delta since the last
    improvement resets the count, so a slow, steady fall is not stopped for ever."""
    early = EarlyStopping(patience=3, min_delta=0.1)
    for step, loss in [(1, 1.0), (2, 0.95), (3, 0.92)]:
        early.update(step, loss)
    assert early.best_step == 3 and early.bad_evals == 2
    early.update(4, 0.89)  # 0.11 below the last improvement (1.0): counts
    assert early.bad_evals == 0 and early.reference_loss == 0.89
    assert not EarlyStopping(patience=0).should_stop


def test_early_stopping_state_survives_json() -> None:
    fresh = json.loads(json.dumps(EarlyStopping().state()))
    assert EarlyStopping.from_state(2, 0.0, fresh) == EarlyStopping(2)
    early = EarlyStopping(patience=2, min_delta=0.01)
    for step, loss in [(1, 2.0), (2, 1.0), (3, 1.2)]:
        early.update(step, loss)
    again = EarlyStopping.from_state(2, 0.01, json.loads(json.dumps(early.state())))
    assert again == early
    assert again.update(4, 1.1) is False and again.should_stop
