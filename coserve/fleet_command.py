"""`coserve plan --fleet RUN_DIR --gen-tok-s X --embed-seq-s Y [SLOs] [--json]`: the flags,
the table and the words of a fleet plan (the model is coserve.fleet).

Exit status: 0 some fleet meets the SLOs, 1 none does, 2 bad input."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from coserve.advise import apart_text
from coserve.fleet import SLOS, Demand, Fleet, Gpus, Rate, Saving, SloCheck, plan_fleet
from coserve.term import stdout_console


def _range_text(g: Gpus) -> str:
    if g.fewest is None or g.most is None:
        return "—"
    return f"{g.fewest:,}..{g.most:,}"


def _rate_text(r: Rate | None, floor: bool = False) -> str:
    """`mean ± half the CI` (the t interval is symmetric); `≥` marks an open-loop floor."""
    if r is None:
        return "—"
    text = ("≥" if floor else "") + f"{r.mean:,.0f}"
    if r.high is not None:
        text += f" ± {r.high - r.mean:,.0f}"
    return text


def _slo_text(checks: list[SloCheck]) -> str:
    bad = [c for c in checks if c.verdict != "meets"]
    if not bad:
        return "meets"
    out = []
    for c in bad:
        text = f"{c.verdict}: {c.name}"
        if c.verdict == "misses":
            text += f" {apart_text(c.measured_ms, c.limit_ms)} > {c.limit_ms:g} ms"
        elif c.verdict == "CI crosses":
            text += (
                f" {apart_text(c.measured_ms, c.limit_ms)} ms, CI to "
                f"{apart_text(c.ci_high_ms, c.limit_ms)} > {c.limit_ms:g}"
            )
        out.append(text)
    return "; ".join(out)


def _units_text(gpus: int, unit: int) -> str:
    """`gpus`, and as units of `unit` GPUs where a unit is more than one."""
    return f"{gpus:,}" if unit <= 1 or gpus == 0 else f"{gpus:,} ({gpus // unit:,} x {unit})"


def _units_note(f: Fleet) -> str:
    """How a deployment of several GPUs is counted, read on the table's first such row ("" when
    every deployment is one GPU: a fixed example read as a figure of this run)."""
    units = [(r.gpus.mean, r.condition_gpus) for r in f.colocated]
    if f.dedicated is not None:
        d = f.dedicated
        units += [(d.gen_gpus.mean, d.gen_unit_gpus), (d.embed_gpus.mean, d.embed_unit_gpus)]
    for gpus, unit in units:
        if unit > 1 and gpus:
            return (
                f"GPUs: whole deployments of a condition's GPUs ({_units_text(gpus, unit)}: "
                f"{gpus // unit:,} of {unit} GPUs each). "
            )
    return ""


def _saving_text(s: Saving | None) -> str:
    """GPUs against the dedicated fleet: `22 more (+39 %)`, `2 fewer (-13 %)` (the share on a
    line of its own, so a narrow column does not break it) or `same`."""
    if s is None:
        return "—"
    if s.gpus == 0:
        return "same"
    return f"{abs(s.gpus):,} {'fewer' if s.gpus > 0 else 'more'}\n({-s.pct:+.0f} %)"


def _range_words(least: int, most: int) -> str:
    """A saving's range over the CIs (dedicated less co-located GPUs) in fewer/more words."""
    if least >= 0:
        span = f"{least:,}" if least == most else f"{least:,}..{most:,}"
        return f"{span} fewer"
    if most <= 0:
        span = f"{-most:,}" if least == most else f"{-most:,}..{-least:,}"
        return f"{span} more"
    return f"{-least:,} more to {most:,} fewer"


def render(f: Fleet, console) -> None:
    """Print the fleet plan on a rich Console: the demand, the table, the answer, the caveat."""
    from rich.table import Table
    from rich.text import Text

    d = f.demand
    slos = [f"{s.name} <= {getattr(d, s.attr):g} ms" for s in SLOS if getattr(d, s.attr)]
    console.print(
        Text(
            f"Fleet for {d.gen_tok_s:,.0f} gen tok/s and {d.embed_seq_s:,.0f} embed seq/s"
            + (f" with {', '.join(slos)}" if slos else " (no latency SLO given)")
            + f", sized on {f.run_dir}"
        )
    )
    t = Table()
    heads = [
        ("fleet", "left"),
        ("gen tok/s\nper GPU", "right"),
        ("embed seq/s\nper GPU", "right"),
        ("GPUs", "right"),
        ("GPUs over\nthe CIs", "right"),
        ("GPUs vs\ndedicated", "right"),
    ]
    if slos:
        heads.append(("SLOs", "left"))
    for head, just in heads:
        t.add_column(head, justify=just)
    width = len(heads)
    ded = f.dedicated
    if ded is not None:
        names = " + ".join(n for n in (ded.gen_condition, ded.embed_condition) if n)
        cells = [
            Text(f"dedicated\n({names})"),
            _rate_text(ded.gen_per_gpu, "gen" in ded.open_loop),
            _rate_text(ded.embed_per_gpu, "embed" in ded.open_loop),
            f"{_units_text(ded.gen_gpus.mean, ded.gen_unit_gpus)}"
            f" + {_units_text(ded.embed_gpus.mean, ded.embed_unit_gpus)}\n= {ded.total.mean:,}",
            _range_text(ded.total),
            "",
            Text(_slo_text(ded.slos)),
        ][:width]
        t.add_row(*cells)
    for r in f.colocated:
        name = r.condition if r.label == r.condition else f"{r.condition}\n({r.label})"
        if r.condition_gpus > 1:
            name += f", {r.condition_gpus} GPUs"
        cells = [
            Text(name),
            _rate_text(r.gen_per_gpu, "gen" in r.open_loop),
            _rate_text(r.embed_per_gpu, "embed" in r.open_loop),
            _units_text(r.gpus.mean, r.condition_gpus).replace(" (", "\n("),
            _range_text(r.gpus),
            _saving_text(r.saving),
            Text(_slo_text(r.slos)),
        ][:width]
        t.add_row(*cells)
    console.print(t)
    for line in lines(f):
        console.print(Text(line))


def lines(f: Fleet) -> list[str]:
    """The answer and the caveats in words, one sentence a line."""
    out = []
    best = next((r for r in f.colocated if r.condition == f.best), None)
    ded = f.dedicated
    if best is not None:
        slos = any(getattr(f.demand, slo.attr) is not None for slo in SLOS)
        text = (
            f"Fewest GPUs co-located{' within the SLOs' if slos else ''}: {best.condition}, "
            f"{best.gpus.mean:,}"
        )
        if best.saving is not None:
            n = best.saving.gpus
            if n > 0:
                text += f", {n:,} fewer than {ded.total.mean:,} dedicated ({best.saving.pct:.1f} %)"
            elif n < 0:
                text += f", {-n:,} more than {ded.total.mean:,} dedicated"
            else:
                text += ", as many as dedicated"
            if best.saving.least is not None:
                text += f"; {_range_words(best.saving.least, best.saving.most)} over the CIs"
        out.append(text + ".")
    elif f.colocated:
        out.append("No co-located condition meets the SLOs.")
    if ded is not None and not ded.meets:
        out.append("Dedicated GPUs miss the SLOs too: a role alone is above a limit.")
    if f.no_dedicated:
        out.append(f.no_dedicated[0].upper() + f.no_dedicated[1:] + ".")
    if any(r.open_loop for r in f.colocated) or (ded is not None and ded.open_loop):
        out.append(
            "≥: that role ran open loop at a fixed rate, so its figure is what was offered, "
            "not the most the GPU could do; the GPU counts on it are upper bounds."
        )
    if ded is not None and ded.open_loop:
        out.append(
            f"The dedicated fleet's {' and '.join(ded.open_loop)} GPUs are sized on an open-loop "
            "figure too: each saving compares two upper bounds and does not say which fleet is "
            "smaller; size dedicated GPUs on a closed-loop (capacity) run of each role alone."
        )
    out.append(
        "Per GPU: mean over finished reps ± half the 95 % CI, divided by the condition's GPUs. "
        + _units_note(f)
        + "GPUs over the CIs: every throughput at its CI's high end..low end; a range against "
        "dedicated pairs one fleet's best end with the other's worst."
    )
    if f.unreadable:
        out.append(f"Warning: {f.unreadable}.")
    out.append(f.caveat)
    return out


# ------------------------------------------------------------------ command line

PLAN_ONLY = ("spec", "gen", "embed", "gpu", "gpu_memory_gib", "gen_util", "embed_util",
             "input_len", "output_len", "concurrency", "max_num_seqs", "block_size", "reserve_gib",
             "kv_cache_bytes", "dtype")  # fmt: skip
FLEET_ONLY = ("gen_tok_s", "embed_seq_s", *(s.attr for s in SLOS))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`coserve plan`'s fleet flags (its --json serves both)."""
    from coserve.text_flags import nonempty

    g = parser.add_argument_group("fleet sizing (--fleet RUN_DIR)")
    g.add_argument(
        "--fleet",
        metavar="RUN_DIR",
        type=nonempty,
        default=None,
        help="size a fleet from a `coserve run` folder's measurements instead; needs both "
        "--gen-tok-s and --embed-seq-s (0 for a role not served)",
    )
    g.add_argument(
        "--gen-tok-s",
        type=float,
        default=None,
        metavar="TOK_S",
        help="gen output tokens/s to serve",
    )
    g.add_argument(
        "--embed-seq-s",
        type=float,
        default=None,
        metavar="SEQ_S",
        help="embed sequences/s to serve",
    )
    for slo in SLOS:
        g.add_argument(
            "--" + slo.attr.replace("_", "-"),
            type=float,
            default=None,
            metavar="MS",
            help=f"SLO: {slo.name} at most this (mean over reps)",
        )


def misplaced(args: argparse.Namespace) -> str | None:
    """The flag given that does not belong with (or without) --fleet, as an error line."""
    with_fleet = args.fleet is not None
    wrong = PLAN_ONLY if with_fleet else FLEET_ONLY
    for attr in wrong:
        if getattr(args, attr, None) not in (None, False):
            flag = "--" + attr.replace("_", "-")
            return f"{flag} " + ("does not go with --fleet" if with_fleet else "needs --fleet")
    if with_fleet:
        for attr in ("gen_tok_s", "embed_seq_s"):
            if getattr(args, attr) is None:
                return f"--fleet needs --{attr.replace('_', '-')}"
    return None


def dispatch(args: argparse.Namespace) -> int | None:
    """`coserve plan`'s fork: the exit status when a flag is out of place (2) or --fleet is
    given (the fleet plan's); None for a VRAM plan."""
    wrong = misplaced(args)
    if wrong:
        from rich.console import Console
        from rich.text import Text

        Console().print(Text.assemble(("plan:", "red"), f" {wrong}"))
        return 2
    return run(args) if args.fleet is not None else None


def run(args: argparse.Namespace) -> int:

    from coserve.report.aggregate import aggregate

    demand = Demand(
        args.gen_tok_s,
        args.embed_seq_s,
        **{s.attr: getattr(args, s.attr) for s in SLOS},
    )
    try:
        fleet = plan_fleet(aggregate(Path(args.fleet)), demand)
    except (FileNotFoundError, ValueError) as e:
        print(f"coserve plan --fleet: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(fleet.to_dict(), indent=2))
    else:
        render(fleet, stdout_console())
    ok = fleet.best is not None or (fleet.dedicated is not None and fleet.dedicated.meets)
    return 0 if ok else 1
