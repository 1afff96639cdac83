"""`coserve run SPEC --out DIR --ray auto|ADDRESS`: each condition-rep as a Ray task.

Each task asks for the condition's GPUs (`num_gpus`: whole GPUs, so on one node; 0 when every
server runs on a CPU, and then the reps go one at a time, since side by side they would share
the cores) and runs the rep on its node exactly as the local runner does
(`Runner.run_rep`: strategy set-up, servers one after the other, load and telemetry,
tear-down on every way out; an MPS condition starts its own daemon on that node). The
condition's GPU indices become the GPUs Ray gave the task, in order. The rep runs in a scratch
folder on the node, removed when the task ends; the task returns the rep's record and files
(RepResult) and the driver writes them into the run folder, rep.json last, so a multi-node
cluster needs no shared file system and `--resume`, `coserve report` and the fingerprint
check read the folder as after a local run. Each rep.json also names the node and GPUs it ran
on (`node`), and every task of a run asks for one GPU model (Ray's `accelerator_type`
resource: the one reps already in the folder ran on, else the cluster's most common), so
conditions whose deltas are compared ran on the same GPU model.

Ctrl-C (or SIGTERM) cancels every task: a running rep gets KeyboardInterrupt, tears down and
leaves nothing; the driver waits for that before it disconnects. Finished reps are kept.
`auto` connects to the cluster Ray finds (RAY_ADDRESS, a running local one) or starts a local
one for the run, stopped at its end. The nodes need coserve installed as the driver has it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import socket
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coserve.experiment import fingerprint as fpmod
from coserve.experiment.runner import Runner, RunRefused, _now
from coserve.experiment.signals import interruptible, no_interrupts
from coserve.spec import Condition, Spec

INSTALL_HINT = "--ray needs Ray on this machine and every node: pip install 'coserve[ray]'"
# How long a cancelled task may take to tear its rep down before the driver stops waiting.
TEARDOWN_WAIT_S = 120.0
ACCELERATOR = "accelerator_type:"


def import_ray():
    """The ray module; RunRefused naming the extra to install when it is missing."""
    try:
        import ray
    except ImportError:
        raise RunRefused(INSTALL_HINT) from None
    return ray


@dataclass(frozen=True)
class Node:
    """Where a rep ran: the Ray node, its host and the GPUs Ray gave the task."""

    node_id: str
    host: str
    ip: str
    gpu_ids: list[str]  # physical indices Ray assigned (empty on a CPU)
    gpu_names: list[str]  # their NVML names, in the same order
    accelerator_type: str | None  # the Ray resource the task asked for (None: any)


@dataclass(frozen=True)
class RepFile:
    path: str  # relative to the rep's folder
    data: bytes


@dataclass(frozen=True)
class RepResult:
    """What a task hands back: the rep's record (rep.json) and every other file it wrote."""

    condition: str
    rep: int
    record: dict[str, Any]
    node: Node | None  # None: the task was lost before it could say
    files: list[RepFile] = field(default_factory=list)


def _node(accelerator_type: str | None) -> Node:
    import ray

    ids = [str(i) for i in ray.get_gpu_ids()]
    by_index = {str(g["index"]): g["name"] for g in fpmod.gpu_state()["gpus"]} if ids else {}
    return Node(
        node_id=ray.get_runtime_context().get_node_id(),
        host=socket.gethostname(),
        ip=ray.util.get_node_ip_address(),
        gpu_ids=ids,
        gpu_names=[by_index.get(i, "?") for i in ids],
        accelerator_type=accelerator_type,
    )


def _on_node(cond: Condition, gpu_ids: list[str]) -> Condition:
    """The condition with its GPU indices replaced by the ones Ray gave the task."""
    if not gpu_ids:
        return cond
    return dataclasses.replace(cond, gpus=gpu_ids[: len(cond.gpus)])


def run_rep_on_node(
    spec: Spec, condition: str, rep: int, apply_mig: bool, accelerator_type: str | None
) -> RepResult:
    """The body of a task: run one rep in a scratch folder of this node and pack it up.
    KeyboardInterrupt (a cancel) passes through after the rep's tear-down."""
    from coserve.experiment import preflight

    node = _node(accelerator_type)
    cond = _on_node(spec.condition(condition), node.gpu_ids)
    scratch = Path(tempfile.mkdtemp(prefix="coserve-ray-"))
    try:
        runner = Runner(spec, scratch, apply_mig=apply_mig)
        runner.fingerprint = fpmod.collect(spec)
        problems = preflight.problems(spec, [cond], fpmod.gpu_state())
        if problems:
            record = failed_record(cond, rep, f"node {node.host}: " + "; ".join(problems))
            return RepResult(condition, rep, record, node)
        with interruptible():
            record = runner.run_rep(cond, rep)
        rep_dir = runner.run_dir.rep_dir(condition, rep)
        files = [
            RepFile(str(p.relative_to(rep_dir)), p.read_bytes())
            for p in sorted(rep_dir.rglob("*"))
            if p.is_file() and p.name != "rep.json"
        ]
        return RepResult(condition, rep, record, node, files)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def failed_record(cond: Condition, rep: int, error: str) -> dict[str, Any]:
    """A rep.json for a rep that never ran (refused on its node, or its task was lost)."""
    return {
        "condition": cond.name,
        "rep": rep,
        "status": "failed",
        "error": error,
        "strategy": cond.strategy,
        "servers": {},
        "started": _now(),
        "finished": _now(),
        "sweep": list(cond.sweep) if cond.sweep else None,
    }


class RayRunner(Runner):
    """A Runner whose reps run as Ray tasks on `address` ("auto": the cluster Ray finds, or a
    local one started for the run)."""

    where = "the Ray cluster"

    def __init__(self, spec: Spec, out, *, address: str, **kwargs):
        import_ray()  # refused at once when Ray is missing
        super().__init__(spec, out, **kwargs)
        self.address = address
        self._ray = None
        self._started = False  # this runner called ray.init, so it shuts Ray down

    def connect(self):
        if self._ray is None:
            if self.address != "auto":
                _reachable(self.address)
            ray = import_ray()
            if not ray.is_initialized():
                try:
                    self._started = True
                    ray.init(
                        address=None if self.address == "auto" else self.address,
                        include_dashboard=False,
                        logging_level="warning",
                        log_to_driver=False,
                    )
                except (ConnectionError, RuntimeError, ValueError) as e:
                    raise RunRefused(f"--ray {self.address}: cannot connect ({e})") from None
            self._ray = ray
        return self._ray

    def disconnect(self) -> None:
        if self._ray is not None and self._started:
            self._ray.shutdown()
        self._ray = None

    def gpus_of(self, cond: Condition) -> int:
        """Whole GPUs the condition's task asks for: 0 when every server runs on a CPU."""
        cluster_gpus = self.connect().cluster_resources().get("GPU", 0)
        devices = {cond.server(self.spec, r).device for r in cond.servers}
        if all(d == "cpu" or (d == "auto" and not cluster_gpus) for d in devices):
            return 0
        return len(cond.gpus)

    def problems(self) -> list[str]:
        """What the scheduled conditions need of the cluster and it lacks (each node's own
        checks run in the task, before the rep)."""
        ray = self.connect()
        most = max((n["Resources"].get("GPU", 0) for n in ray.nodes() if n["Alive"]), default=0)
        out = []
        for cond in {c.name: c for c, _ in self.schedule()}.values():
            n = self.gpus_of(cond)
            if any(not g.isdigit() for g in cond.gpus):
                out.append(
                    f"{cond.name}: gpus {list(cond.gpus)} name GPUs by UUID; with --ray, Ray "
                    "picks the GPUs: give indices (gpus = ['0', '1'] for two)"
                )
            elif n > most:
                out.append(
                    f"{cond.name}: needs {n} GPU(s) on one node; the most any has is {most:g}"
                )
        return out

    def accelerator_type(self) -> str | None:
        """The Ray resource naming the GPU model every task asks for: the one the folder's
        reps ran on, else the cluster's model with the most GPUs (None: no GPU model known)."""
        for r in self.run_dir.records():
            kind = (r.get("node") or {}).get("accelerator_type")
            if kind:
                return kind
        kinds = {
            k: v for k, v in self.connect().cluster_resources().items() if k.startswith(ACCELERATOR)
        }
        if not kinds:
            return None
        totals: dict[str, float] = {}
        for n in self.connect().nodes():
            for k in kinds:
                if n["Alive"] and k in n["Resources"]:
                    totals[k] = totals.get(k, 0) + n["Resources"].get("GPU", 0)
        return max(sorted(kinds), key=lambda k: totals.get(k, 0))

    def run(self) -> list[dict]:
        try:
            return super().run()
        finally:
            with no_interrupts():
                self.disconnect()

    def _run(self) -> list[dict]:
        ray = self.connect()
        task = ray.remote(run_rep_on_node)
        progress = self.progress
        self._say_resume_notes()
        kind = self.accelerator_type()
        pending: dict[Any, tuple[Condition, int]] = {}
        records: list[dict] = []
        # CPU reps one at a time: side by side they would share the cores, and each would
        # measure the other (the demo's gen-only "baseline" ran beside embed-only). GPU reps
        # hold their GPUs whole and run side by side.
        on_cpu: list[tuple[Condition, int]] = []
        cpu_refs: set[Any] = set()  # the CPU rep in flight (one at most)

        def send(cond: Condition, rep: int, gpus: int) -> None:
            pin = {kind: 0.001} if gpus and kind else {}
            ref = task.options(
                num_gpus=gpus,
                num_cpus=1,
                resources=pin,
                max_retries=0,
                name=f"coserve {cond.name} rep {rep}",
            ).remote(self.spec, cond.name, rep, self.apply_mig, kind if pin else None)
            pending[ref] = (cond, rep)
            if not gpus:
                cpu_refs.add(ref)

        with interruptible():
            try:
                for cond, rep in self.schedule():
                    if self.finished(cond, rep):
                        if progress:
                            progress.skip_rep(cond.name, rep, self.spec.reps_of(cond))
                        continue
                    gpus = self.gpus_of(cond)
                    if gpus:
                        send(cond, rep, gpus)
                    else:
                        on_cpu.append((cond, rep))
                if progress:
                    progress.message(
                        f"ray: {len(pending) + len(on_cpu)} rep(s) for the cluster"
                        + (f" ({len(on_cpu)} on CPUs, one at a time)" if on_cpu else "")
                    )
                if on_cpu:
                    send(*on_cpu.pop(0), 0)
                while pending:
                    # a timeout, so that Ctrl-C is heard between waits
                    done, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
                    for ref in done:
                        cond, rep = pending.pop(ref)
                        records.append(self._finish(ray, ref, cond, rep))
                        if ref in cpu_refs:
                            cpu_refs.discard(ref)
                            if on_cpu:
                                send(*on_cpu.pop(0), 0)
            except KeyboardInterrupt:
                with no_interrupts():
                    self._cancel(ray, pending)
                raise
        return records

    def _finish(self, ray, ref, cond: Condition, rep: int) -> dict:
        """Write the task's rep into the run folder, whole even when Ctrl-C comes meanwhile
        (it is raised after); a task that raised is recorded as a failed rep."""
        try:
            res: RepResult = ray.get(ref)
        except ray.exceptions.RayError as e:
            record = failed_record(cond, rep, f"the Ray task failed: {str(e).strip()[-2000:]}")
            res = RepResult(cond.name, rep, record, None)
        with no_interrupts() as signals:
            record = self._write(res)
        if self.progress:
            self.progress.index += 1
            self.progress.end_rep(record)
        if signals:
            raise KeyboardInterrupt
        return record

    def _write(self, res: RepResult) -> dict:
        """The rep's files, then rep.json (with `node`); returns the record."""
        rd = self.run_dir
        try:
            rep_dir = rd.fresh_rep_dir(res.condition, res.rep)
            for f in res.files:
                path = (rep_dir / f.path).resolve()
                if not path.is_relative_to(rep_dir.resolve()):
                    raise ValueError(f"a task returned a file outside its rep: {f.path}")
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(f.data)
            node = None if res.node is None else dataclasses.asdict(res.node)
            record = {**res.record, "node": node}
            rd.finish_rep(res.condition, res.rep, record)
        except OSError:
            rd.drop_temporaries(res.condition, res.rep)
            raise
        return record

    def _cancel(self, ray, pending: dict) -> None:
        """Cancel every task and wait for the running ones to tear down; a rep that finished
        meanwhile is kept."""
        for ref in pending:
            with contextlib.suppress(Exception):
                ray.cancel(ref)
        if not pending:
            return
        done, _ = ray.wait(list(pending), num_returns=len(pending), timeout=TEARDOWN_WAIT_S)
        for ref in done:
            with contextlib.suppress(Exception):
                res = ray.get(ref, timeout=0)
                if isinstance(res, RepResult) and res.record.get("status") == "ok":
                    self._write(res)


def _reachable(address: str, timeout_s: float = 5.0) -> None:
    """Raises RunRefused unless `address` (HOST:PORT or ray://HOST:PORT) takes a TCP
    connection within `timeout_s`: ray.init retries an unreachable head for minutes, deaf to
    Ctrl-C."""
    hostport = address.removeprefix("ray://")
    host, sep, port = hostport.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise RunRefused(
            f"--ray {address}: expected auto, HOST:PORT or ray://HOST:PORT (the head node's "
            "GCS or Ray Client port)"
        )
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise RunRefused(f"--ray {address}: nothing answers there ({e})") from None
