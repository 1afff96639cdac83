"""Run a spec: conditions x reps, each rep from nothing to its results on disk.

One rep: the sharing strategy is set up (environment, daemons), the servers start one after
the other (two engines starting at once on one GPU mis-size their KV caches, vllm#9198),
telemetry sampling and the load run together over warm-up + window, everything is torn
down, and only then is the rep's record written (atomically) to the run folder. Tear-down
runs on every way out (failure, Ctrl-C, SIGTERM, a crash in coserve itself) and cannot be
interrupted by a second Ctrl-C, so no server or daemon outlives the run. While the load runs
the servers' processes are watched: one that dies stops the load within a second and fails
the rep with its log's reason.

The run holds the folder's lock (a second run into it is refused, naming this one's PID) and
checks what the spec needs of the machine before the first rep (preflight.py). A run folder
that cannot be written (full, read-only) stops the run with StorageError; the rep in flight
is left unfinished, so `--resume` runs it again.

A rep that fails (a server that does not come up, a strategy the machine cannot give) is
recorded as failed with the reason and the run goes on; Ctrl-C stops the run, keeping every
finished rep; `--resume` later runs what is missing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import time
import traceback
from pathlib import Path
from typing import Any

from coserve.experiment import fingerprint as fpmod
from coserve.experiment import preflight, resume
from coserve.experiment.backend import Backend, resolve_device
from coserve.experiment.failure import storage_error
from coserve.experiment.rep import (
    DEATH_GRACE_S,
    compress_records,
    first_dead,
    first_dead_within,
    load_problem,
    power_at_start,
    window_telemetry,
)
from coserve.experiment.resume import RunRefused
from coserve.experiment.rundir import (
    FolderBusy,
    RunDir,
    set_aside,
    write_atomic,
    write_json,
)
from coserve.experiment.signals import interruptible, no_interrupts
from coserve.spec import Condition, Spec


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


class Runner:
    where = "this machine"  # what runs the reps, as refusals name it

    def __init__(
        self,
        spec: Spec,
        out: str | Path,
        *,
        spec_text: str | None = None,
        resume: bool = False,
        only: list[str] | None = None,
        backend: Backend | None = None,
        progress=None,
        apply_mig: bool = False,
    ):
        self.spec = spec
        self.run_dir = RunDir(out)
        self.spec_text = spec_text
        self.resume = resume
        self.only = only
        self.backend = backend or Backend()
        self.progress = progress
        self.apply_mig = apply_mig  # as `apply_mig = true` in every mig condition's options
        self.fingerprint: dict[str, Any] = {}
        self.warnings: list[str] = []
        self.notes: list[str] = []  # what a resume repaired or set aside
        self._device: dict[str, str] = {}
        self._telemetry_noted = False
        if only is not None:
            names = [c.name for c in spec.all_conditions()]
            unknown = [n for n in only if n not in names]
            if not only:
                raise RunRefused(
                    f"--conditions: no condition named (conditions: {', '.join(names)})"
                )
            if unknown:
                raise RunRefused(
                    f"--conditions: {', '.join(unknown)} not in the spec "
                    f"(conditions: {', '.join(names)})"
                )

    # ------------------------------------------------------------------ set-up
    def check_folder(self) -> dict[str, Any] | None:
        """Whether this run may write its folder, leaving the disk as it was (a dry run asks it
        too): the folder's fingerprint when it holds a run to resume, None for a new or empty
        folder. Raises RunRefused: --resume where there is no run, a run there without
        --resume, other files there, a fingerprint that cannot be read, a path that cannot be
        read as a folder (a file), a new folder that cannot be made or written."""
        try:
            return self._check_folder()
        except OSError as e:
            raise _unusable_folder(self.run_dir.path, e) from e

    def _check_folder(self) -> dict[str, Any] | None:
        rd = self.run_dir
        if not rd.exists():
            if self.resume:
                raise RunRefused(
                    f"nothing to resume in {rd.path}: it holds no coserve run (no "
                    f"{rd.fingerprint_file.name}); leave out --resume to start one"
                )
            if not rd.is_empty():
                raise RunRefused(
                    f"{rd.path} exists and is not a coserve run folder; "
                    "choose an empty or new --out"
                )
            rd.check_writable()
            return None
        old = resume.old_fingerprint(rd)
        if not self.resume:
            raise RunRefused(
                f"{rd.path} already holds a run (started {old.get('created', '?')}); add "
                f"--resume to finish it (a finished run is only reported again), or choose "
                f"another --out"
            )
        return old

    def prepare(self) -> None:
        """Check the folder and the environment; write spec and fingerprint on a first run.
        Raises RunRefused (check_folder's and resume.check's refusals)."""
        rd = self.run_dir
        new = fpmod.collect(self.spec)
        spec_dict = self.spec.to_dict()
        old = self.check_folder()  # again under the lock: another run may have begun since
        if old is not None:
            # a grown spec is taken only with its text, which replaces the folder's spec.toml
            found = resume.check(rd, old, new, spec_dict, self.spec_text is not None)
            self.warnings, self.notes = found.warnings, found.notes
            if found.grown:  # the folder takes the spec
                old["spec"] = {**new["spec"], "before": old["spec"]}
                self._write_spec(spec_dict, old)
        else:
            rd.path.mkdir(parents=True, exist_ok=True)
            self._write_spec(spec_dict, new)
        self.fingerprint = new

    def _write_spec(self, spec_dict: dict[str, Any], fingerprint: dict[str, Any]) -> None:
        rd = self.run_dir
        if self.spec_text is not None:
            write_atomic(rd.spec_file, self.spec_text)
        write_json(rd.spec_json, spec_dict)
        write_json(rd.fingerprint_file, fingerprint)

    def schedule(self) -> list[tuple[Condition, int]]:
        return self.spec.schedule(self.only)

    def problems(self) -> list[str]:
        """What the scheduled conditions need and this machine lacks (empty: nothing known)."""
        conds = [c for c, _ in self.schedule()]
        return preflight.problems(self.spec, conds, self.backend.gpu_state())

    # ------------------------------------------------------------------ the run
    def run(self) -> list[dict]:
        """Run every scheduled rep not yet finished; returns this invocation's records.
        Raises RunRefused (folder busy or not resumable, machine lacks what the spec needs),
        StorageError (the folder cannot be written), KeyboardInterrupt (Ctrl-C, SIGTERM)."""
        problems = self.problems()  # before anything is written
        if problems:
            raise RunRefused(
                f"{self.where} cannot run the spec:\n" + "\n".join(f"  - {p}" for p in problems)
            )
        rd = self.run_dir
        with contextlib.ExitStack() as stack:
            try:
                self.check_folder()  # before the lock makes the folder and its lock file
                stack.enter_context(rd.locked())
                self.prepare()
            except FolderBusy as e:
                raise RunRefused(str(e)) from None
            except OSError as e:  # nothing has run: the folder cannot be used
                raise _unusable_folder(rd.path, e) from e
            try:
                return self._run()
            except OSError as e:
                err = storage_error(e, rd.path)
                if err is None:
                    raise
                raise err from e

    def _run(self) -> list[dict]:
        sched = self.schedule()
        records = []
        progress = self.progress
        self._say_resume_notes()
        with interruptible():
            for cond, rep in sched:
                reps = self.spec.reps_of(cond)
                if self.finished(cond, rep):
                    if progress:
                        progress.skip_rep(cond.name, rep, reps)
                    continue
                if progress:
                    progress.start_rep(cond.name, rep, reps)
                try:
                    record = self.run_rep(cond, rep)
                except OSError:
                    self.run_dir.drop_temporaries(cond.name, rep)
                    raise
                records.append(record)
                if progress:
                    progress.end_rep(record)
        return records

    def _say_resume_notes(self) -> None:
        """What `prepare` found on a resume (environment differences, repairs), as notes."""
        if self.progress:
            for w in self.warnings:
                self.progress.message(f"note: resuming with {w}")
            for n in self.notes:
                self.progress.message(f"note: {n}")

    def finished(self, cond: Condition, rep: int) -> bool:
        """Whether the rep finished ok earlier. A rep whose rep.json is there but cannot be
        read is set aside first (its folder renamed rep-K.damaged-N, with a note), so running
        it again does not overwrite the earlier measurement's files."""
        rd = self.run_dir
        prev = rd.rep_record(cond.name, rep)
        if prev is not None:
            return prev.get("status") == "ok"
        damaged = rd.damaged_rep(cond.name, rep)
        if damaged is not None:
            kept = set_aside(rd.rep_dir(cond.name, rep))
            if self.progress:
                self.progress.message(
                    f"note: {damaged}; the rep runs again and its earlier folder is kept as {kept}"
                )
        return False

    def _phase(self, name: str) -> None:
        if self.progress:
            self.progress.phase(name)

    def device(self, want: str) -> str:
        if want not in self._device:
            self._device[want] = resolve_device(want)
        return self._device[want]

    def server_spec(self, cond: Condition, role: str, strategy, urls: dict[str, str] | None = None):
        """The launch spec of `role` and its config; `urls` of the servers already up (gen
        first), which the embed server's SLO guard reads."""
        cfg = cond.server(self.spec, role)
        if cond.strategy.startswith("tp"):  # the strategy holds the TP degree
            cfg = dataclasses.replace(cfg, tensor_parallel_size=strategy.tensor_parallel_size(role))
        starts_guard = cfg.slo_guard and cfg.launcher == "builtin"  # else it guards itself
        guard = {"slo_guard_gen_url": (urls or {})["gen"]} if starts_guard else {}
        return cfg.server_spec(role, self.device(cfg.device), **guard), cfg

    def load_config(self, cond: Condition, urls: dict[str, str]) -> dict[str, Any]:
        load = dataclasses.asdict(cond.load_for(self.spec))
        return {
            **load,
            "gen_url": urls.get("gen"),
            "embed_url": urls.get("embed"),
            "seed": self.spec.seed,
        }

    def run_rep(self, cond: Condition, rep: int) -> dict:
        """Run one rep and write its record; KeyboardInterrupt passes through (after tear-down)."""
        rep_dir = self.run_dir.fresh_rep_dir(cond.name, rep)
        started, t_start = _now(), time.monotonic()
        record: dict[str, Any] = {
            "condition": cond.name,
            "rep": rep,
            "status": "failed",
            "error": None,
            "strategy": cond.strategy,
            "servers": {},
            "started": started,
            "sweep": list(cond.sweep) if cond.sweep else None,
            "env": fpmod.short(self.fingerprint),
            "phases_s": {},
        }
        phases = record["phases_s"]
        stack = contextlib.ExitStack()
        interrupted = False
        servers: list = []
        died = None  # a server's death, which is the reason whatever else failed after it
        try:
            try:
                t = time.monotonic()
                self._phase("strategy set-up")
                options = dict(cond.options)
                if self.apply_mig and cond.strategy == "mig":
                    options["apply_mig"] = True
                strategy = stack.enter_context(
                    self.backend.strategy(
                        cond.strategy, list(cond.gpus), options, (rep_dir / "strategy").resolve()
                    )
                )
                record["strategy_info"] = strategy.describe()
                phases["strategy"] = round(time.monotonic() - t, 3)
                urls = {}
                for role in ("gen", "embed"):
                    if role not in cond.servers:
                        continue
                    t = time.monotonic()
                    self._phase(f"starting {role} server")
                    sspec, cfg = self.server_spec(cond, role, strategy, urls)
                    server = self.backend.start_server(
                        sspec, strategy.env_for(role), rep_dir / f"{role}.log", cfg.ready_timeout_s
                    )
                    stack.callback(server.stop)
                    servers.append(server)
                    urls[role] = server.url
                    record["servers"][role] = {
                        "url": server.url,
                        "pid": getattr(server, "pid", None),
                        "launcher": cfg.launcher,
                        "model": cfg.model,
                        "device": sspec.device,
                        "tensor_parallel_size": cfg.tensor_parallel_size,
                        "enforce_eager": cfg.enforce_eager,
                        "gpu_memory_utilization": cfg.gpu_memory_utilization,
                        "max_num_seqs": cfg.max_num_seqs,
                        "max_num_batched_tokens": cfg.max_num_batched_tokens or None,
                        "slo_guard": cfg.slo_guard,
                    }
                    phases[f"start_{role}"] = round(time.monotonic() - t, 3)
                t = time.monotonic()
                sampler = None
                if self.spec.telemetry.enabled:
                    devices = list(strategy.telemetry_devices() or cond.gpus)
                    sampler = self.backend.telemetry(
                        devices, self.spec.telemetry.interval_s, rep_dir / "telemetry.jsonl"
                    )
                    sampler.start()
                    stack.callback(sampler.stop)  # stop() may be called twice
                    if not sampler.available and not self._telemetry_noted:
                        self._telemetry_noted = True
                        if self.progress:
                            # a state, not a failure: CPU runs have nothing to sample
                            self.progress.message(f"    telemetry off: {sampler.status()}")
                trace = None
                if "embed" in urls and cond.server(self.spec, "embed").slo_guard:
                    trace = self.backend.guard_trace(
                        urls["embed"], self.spec.telemetry.interval_s, rep_dir / "slo_guard.jsonl"
                    )
                    trace.start()
                    stack.callback(trace.stop)  # stop() may be called twice
                self._phase("warm-up and measurement")
                load = self.load_config(cond, urls)
                record["load"] = load
                on_progress = self.progress.load_progress if self.progress else None
                try:
                    summary = self.backend.run_load(
                        load, rep_dir / "bench.json", on_progress, dead=lambda: first_dead(servers)
                    )
                finally:  # a load that raised (a server died under it) is timed too
                    phases["load"] = round(time.monotonic() - t, 3)
                record["bench"] = summary
                if trace is not None:
                    record["slo_guard"] = self.backend.guard_state(urls["embed"])
                    record["slo_guard_trace"] = {"file": "slo_guard.jsonl", "rows": trace.stop()}
                if sampler is not None:
                    record["telemetry"] = {
                        "all": sampler.stop(),
                        "window": window_telemetry(sampler.rows, summary),
                        "at_start": power_at_start(sampler.at_start),
                        "status": sampler.status(),
                        "devices": list(sampler.devices),
                    }
                for server in servers:  # one that died during the load fails the rep
                    server.check()
                if summary.get("cut_short"):
                    raise KeyboardInterrupt
                record["error"] = load_problem(summary, cond.servers)
                if record["error"]:  # a server dying under the load is the cause to name
                    record["error"] = first_dead_within(servers, DEATH_GRACE_S) or record["error"]
                record["status"] = "failed" if record["error"] else "ok"
            except KeyboardInterrupt:
                interrupted = True
                raise
            except Exception:
                # before the tear-down stops them all
                died = first_dead_within(servers, DEATH_GRACE_S)
                raise
            finally:
                t = time.monotonic()
                self._phase("tear-down")
                with no_interrupts() as signals:
                    stack.close()
                phases["teardown"] = round(time.monotonic() - t, 3)
        except Exception as e:
            if interrupted:  # tear-down failed after a Ctrl-C: still stop
                raise KeyboardInterrupt from e
            if storage_error(e, self.run_dir.path):  # the run stops; this rep stays unfinished
                raise
            # the rep failed; the run goes on
            record["status"] = "failed"
            record["error"] = (
                record["error"] or died or f"{type(e).__name__}: {str(e).strip() or '(no message)'}"
            )
            write_atomic(rep_dir / "error.txt", traceback.format_exc())
        compress_records(rep_dir)
        record["finished"] = _now()
        record["elapsed_s"] = round(time.monotonic() - t_start, 3)
        self.run_dir.finish_rep(cond.name, rep, record)
        if signals:  # Ctrl-C during tear-down: the rep was whole and is kept; now stop
            raise KeyboardInterrupt
        return record


def _unusable_folder(path, e: OSError) -> RunRefused:
    """The refusal of a run folder the OS will not let the run use (`e`), before any rep."""
    return RunRefused(
        f"cannot use {path} as the run folder: {e.strerror or e}"
        + (f" ({e.filename})" if e.filename else "")
        + "; choose another --out"
    )
