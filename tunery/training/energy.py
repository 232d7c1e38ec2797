"""Energy and carbon of a training run: codecarbon's OfflineEmissionsTracker around the training loop.

    energy = EnergyMeter.for_run(cfg, run_dir, world, resume)   # before the model loads: probes the hardware
    with energy:                               # the training loop
        ...                                    # each checkpoint stores energy.so_far() in its counters
    summary["energy"] = energy.record()        # kWh, kg CO2e, how they were obtained

What the numbers are. Where the CPU has RAPL counters (Linux on bare metal, Intel and recent AMD), CPU
energy is measured. Elsewhere (virtual machines such as this project's CI, many laptops without read
access to the counters) codecarbon estimates it: a power figure for the CPU (its table of CPU models, or
`cpu_power_watts`) times the CPU load. RAM is always an estimate from the memory size. The record's
`method` says which applies. CO2e is the kWh times the yearly average carbon intensity of the grid of
`energy_country` (codecarbon's tables; WORLD is its world average, 475 g/kWh), not the hour's real mix.

Processes. A single process is tracked in codecarbon's "process" mode (this process's CPU time and its
children's), so other programs on the laptop are not billed to the run. Under torchrun the main process
tracks the whole machine ("machine" mode) instead: the other ranks are its siblings, not its children,
so process mode would miss them; other programs' load then counts too, and other machines of a
multi-node run are not counted (the method says so).

Resume. Checkpoints keep the energy so far, and a resumed run adds its own. A killed run loses the
energy spent since its last checkpoint (the steps after it are redone, and counted, on resume).

Cost and side effects. codecarbon probes the hardware once per process (~1.5 s, most of it py-cpuinfo
timing the CPU in a subprocess). The probe runs in a background thread while the recipe loads the model
and data; if the loop starts before it is over, the first reading waits for it, and the seconds the
tracker missed are counted at the segment's mean power. The tracker writes no file (no CSV, no lock
file, no API), uses no network, and logs errors only (warnings too with `tunery -v`). If codecarbon
fails, the record is `{"error": ...}` and the run carries on.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.resources
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from tunery.errors import TuneryError

log = logging.getLogger("tunery")

WORLD = "WORLD"  # no country: codecarbon's world-average carbon intensity
READ_EVERY_SECONDS = 1.0  # so_far() runs every step; a fresh reading at most this often


@functools.cache
def country_names() -> dict[str, str]:
    """ISO-3 code -> country name, for the countries codecarbon has grid data for."""
    path = importlib.resources.files("codecarbon") / "data" / "private_infra" / "global_energy_mix.json"
    return {code: row.get("country_name", code) for code, row in json.loads(path.read_text()).items()}


def check_energy_fields(cfg: Any) -> None:
    """Config checks: `energy_country` must be one codecarbon knows, offline it cannot guess it."""
    country = cfg.energy_country.upper()
    try:
        known = country_names()
    except Exception:  # a broken codecarbon must not stop training; the meter records the error
        known = {country: country} if len(country) == 3 and country.isalpha() else {}
    if country != WORLD and country not in known:
        raise TuneryError(
            f"energy_country {cfg.energy_country!r} is not an ISO 3166 alpha-3 code codecarbon has grid data "
            f"for (e.g. FRA, DEU, USA, GBR, IND); use {WORLD} for the world-average carbon intensity"
        )
    if cfg.cpu_power_watts is not None and cfg.cpu_power_watts <= 0:
        raise TuneryError(
            f"cpu_power_watts must be > 0 (the CPU's power in watts), got {cfg.cpu_power_watts}"
        )


def tracker_version() -> str:
    try:
        return f"codecarbon {importlib.metadata.version('codecarbon')}"
    except importlib.metadata.PackageNotFoundError:
        return "codecarbon (not installed)"


class EnergyMeter:
    """Tracks one segment of a run (from start or resume to the end of the training loop) and adds it to
    the energy recorded in the checkpoint it resumed from."""

    def __init__(
        self,
        enabled: bool = True,
        country: str = WORLD,
        cpu_power_watts: float | None = None,
        tracking_mode: str = "process",
        note: str = "",
        prior: dict[str, Any] | None = None,
    ) -> None:
        self.enabled = enabled
        self.country = country.upper()
        self.cpu_power_watts = cpu_power_watts
        self.tracking_mode = tracking_mode
        self.note = note  # appended to the method, e.g. what a multi-node run leaves out
        self.prior = prior  # the energy of the segments before this one (a checkpoint's counters)
        self._tracker: Any = None
        self._thread: threading.Thread | None = None
        self._error: str | None = None
        self._method = ""
        self._entered = self._exited = 0.0
        self._last: dict[str, Any] | None = None
        self._last_read = -float("inf")
        self._final: dict[str, Any] | None = None
        self._running = False

    @classmethod
    def for_run(cls, cfg: Any, run_dir: Path, world: Any, resume: bool) -> EnergyMeter:
        """The meter for a recipe, on the main process only, with the energy of earlier segments read from
        the checkpoint the run resumes from. It starts probing the hardware at once, in the background:
        called before the model loads, the probe is over by the first step."""
        from tunery.training.checkpoint import list_checkpoints  # torch: only when a recipe asks

        prior = None
        checkpoints = list_checkpoints(run_dir) if resume else []
        if checkpoints:
            prior = json.loads((checkpoints[-1] / "state.json").read_text()).get("energy")
        note = ""
        if world.size > 1:
            local = int(os.environ.get("LOCAL_WORLD_SIZE", world.size))
            if local < world.size:
                note = f"; this machine's {local} of {world.size} processes only, other machines not counted"
        meter = cls(
            enabled=cfg.track_energy and world.is_main,
            country=cfg.energy_country,
            cpu_power_watts=cfg.cpu_power_watts,
            tracking_mode="machine" if world.size > 1 else "process",
            note=note,
            prior=prior,
        )
        return meter.probe()

    # --- the tracker's life ------------------------------------------------------------------------------

    def probe(self) -> EnergyMeter:
        """Build the tracker and let it probe the hardware in a background thread. Nothing runs yet: an
        error before the training loop leaves no tracker behind."""
        if self.enabled and self._thread is None and not (self.prior and "error" in self.prior):
            self._thread = threading.Thread(target=self._build, name="tunery-energy", daemon=True)
            self._thread.start()
        return self

    def __enter__(self) -> EnergyMeter:
        self._entered = time.monotonic()
        self.probe()
        if self._thread is not None and not self._thread.is_alive():
            self._ready()  # the usual case: the probe ran while the model loaded
        return self

    def __exit__(self, *exc: object) -> None:
        self._exited = time.monotonic()
        tracker = self._ready()
        if tracker is None:
            return
        try:
            tracker.stop()
            data = getattr(tracker, "final_emissions_data", None)
            if data is None:
                raise RuntimeError("codecarbon returned no data when stopped")
            self._final = self._combine(data, self._exited)
        except Exception as exc:  # the run matters more than its energy figure
            self._error = f"{type(exc).__name__}: {exc}"
        self._tracker = None

    def _build(self) -> None:
        try:
            import codecarbon
            from codecarbon.core.cpu import is_rapl_available

            verbose = log.isEnabledFor(logging.DEBUG)
            logging.getLogger("codecarbon").setLevel(logging.WARNING if verbose else logging.ERROR)
            rapl = is_rapl_available()
            # Measured RAPL energy beats any power figure: codecarbon skips RAPL when given one.
            forced = self.cpu_power_watts if not rapl else None
            tracker = codecarbon.OfflineEmissionsTracker(
                country_iso_code=None if self.country == WORLD else self.country,
                project_name="tunery",
                tracking_mode=self.tracking_mode,
                force_cpu_power=forced,
                force_ram_power=None,
                pue=1.0,
                # Readings come from so_far(), at most once a second, so the tracker's own scheduler
                # would only race them; its 1 s load sampler still runs.
                measure_power_secs=24 * 3600,
                output_methods=[],  # no emissions.csv: summary.json holds the numbers
                output_handlers=[],
                emissions_endpoint=None,
                allow_multiple_runs=True,  # the lock alternative writes to /tmp and takes SIGINT/SIGTERM
                electricitymaps_api_token=None,
                log_level="warning" if verbose else "error",
            )
            # A token in ~/.codecarbon.config would make it query Electricity Maps over the network.
            tracker._electricitymaps_api_token = None
            tracker.get_detected_hardware()  # the slow part: CPU model, power figure, RAM size
            self._method = describe_method(tracker, forced is not None, rapl) + self.note
            self._tracker = tracker
        except Exception as exc:
            self._error = f"{type(exc).__name__}: {exc}"

    def _ready(self) -> Any:
        """The running tracker, started on first use once the probe is over (None if it failed). Waiting
        here, rather than reading nothing, keeps every checkpoint's figure complete."""
        if self._thread is None or self._error is not None:
            return None
        if self._thread.is_alive():
            self._thread.join()
        tracker = self._tracker
        if tracker is not None and not self._running:
            self._running = True
            try:
                tracker.start()
                if tracker._start_time is None:  # start() swallows its own exceptions
                    raise RuntimeError("codecarbon could not start (run with tunery -v to see why)")
            except Exception as exc:
                self._error, self._tracker = f"{type(exc).__name__}: {exc}", None
                return None
        return self._tracker

    # --- readings ----------------------------------------------------------------------------------------

    def so_far(self) -> dict[str, Any] | None:
        """The run's energy up to now (this segment and the earlier ones), for the checkpoint counters.
        Cheap enough to call every step: it reads the tracker at most once a second."""
        if not self.enabled:
            return None
        now = time.monotonic()
        if now - self._last_read < READ_EVERY_SECONDS and self._last is not None:
            return self._last
        self._last_read = now
        tracker = self._ready()
        if tracker is None:
            self._last = self._failed()
        else:
            try:
                tracker._measure_power_and_energy()
                self._last = self._combine(tracker._prepare_emissions_data(), now)
            except Exception as exc:
                self._error = f"{type(exc).__name__}: {exc}"
                self._last = self._failed()
        return self._last

    def record(self) -> dict[str, Any] | None:
        """What summary.json records, once the meter has exited (None when tracking is off)."""
        if not self.enabled:
            return None
        if self._error is not None or self._final is None:
            return self._failed()
        return self._final

    def _failed(self) -> dict[str, Any]:
        error = self._error or "codecarbon did not report"
        if self.prior and "error" in self.prior:
            error = self.prior["error"]
        return {"error": error, "tracker": tracker_version()}

    def _combine(self, data: Any, now: float) -> dict[str, Any]:
        """This segment's reading, scaled from the tracked seconds to the whole segment (the tracker starts
        after its hardware probe), plus the earlier segments."""
        if self.prior and "error" in self.prior:
            return self._failed()
        seconds = now - self._entered
        scale = seconds / max(float(data.duration), 1e-6)
        prior = self.prior or {}
        cpu_kwh = prior.get("cpu_kwh", 0.0) + scale * float(data.cpu_energy)
        ram_kwh = prior.get("ram_kwh", 0.0) + scale * float(data.ram_energy)
        gpu_kwh = prior.get("gpu_kwh", 0.0) + scale * float(data.gpu_energy)
        kwh = prior.get("kwh", 0.0) + scale * float(data.energy_consumed)
        kg = prior.get("kg_co2e", 0.0) + scale * float(data.emissions)
        duration = prior.get("duration_s", 0.0) + seconds
        method = prior.get("method") or self._method
        if not method.endswith(self._method):  # resumed on other hardware, or with other settings
            method = f"{method}; after a resume: {self._method}"
        watts = 3.6e6 / max(duration, 1e-9)  # kWh over the run -> mean watts
        record = {
            "kwh": kwh,
            "kg_co2e": kg,
            "country": self.country,
            "country_name": "world average" if self.country == WORLD else country_names().get(self.country),
            "carbon_intensity_g_per_kwh": round(1000 * kg / kwh, 1) if kwh > 0 else None,
            "method": method,
            "cpu_power_w": round(cpu_kwh * watts, 2),
            "ram_power_w": round(ram_kwh * watts, 2),
            "cpu_kwh": cpu_kwh,
            "ram_kwh": ram_kwh,
            "duration_s": round(duration, 2),
            "tracking_mode": self.tracking_mode,
            "segments": int(prior.get("segments", 0)) + 1,
            "tracker": tracker_version(),
        }
        if gpu_kwh > 0:
            record.update(gpu_kwh=gpu_kwh, gpu_power_w=round(gpu_kwh * watts, 2))
        return record


def describe_method(tracker: Any, forced_cpu_power: bool, rapl: bool) -> str:
    """One line on how codecarbon got its numbers, from the hardware it set up."""
    hardware = {type(h).__name__: h for h in getattr(tracker, "_hardware", [])}
    cpu = hardware.get("CPU")
    mode = getattr(cpu, "_mode", "unknown")
    model = getattr(tracker, "_conf", {}).get("cpu_model") or "this CPU"
    load = "this process's" if getattr(tracker, "_tracking_mode", "") == "process" else "the machine's"
    ram = f"RAM estimated from {load} memory size"
    if mode == "intel_rapl":
        return f"measured: CPU energy from RAPL counters; {ram}"
    if mode in ("apple_powermetrics", "intel_power_gadget", "windows_emi"):
        return f"measured: CPU power from {mode.replace('_', ' ')}; {ram}"
    watts = getattr(cpu, "_tdp", None)
    figure = f"{watts:g} W" if isinstance(watts, int | float) else "a power figure"
    source = "cpu_power_watts" if forced_cpu_power else f"codecarbon's figure for {model}"
    shape = f"x {load} CPU load" if mode == "cpu_load" else "at a constant share"
    no_rapl = " (no RAPL on this machine)" if not rapl else ""
    return f"estimated: CPU {figure} ({source}) {shape}, {ram}{no_rapl}"
