"""The flags of `coserve serve`'s profiling endpoints (profile_api.py) and their defaults,
apart from the endpoints: building the command line (`coserve --help`) imports these, and
profile_api.py's HTTP stack (aiohttp) cost it about half a second."""

from __future__ import annotations

from coserve.server.serve_flags import positive_int, seconds

DEFAULT_STEPS = 20
# Long enough for gen's window to overlap an embed server's first steps (docs/mechanism.md:
# at 20 steps alone, gen's ~0.5 s time-sliced window missed embed's 677 ms steps entirely).
DEFAULT_MIN_S = 2.0


def add_flags(group) -> None:
    """--profile-dir, --profile-steps and --profile-min-seconds on `group` (a
    serve_flags.KindGroup of gen, embed)."""
    group.add_argument(
        "--profile-dir",
        metavar="DIR",
        default=None,
        help="enable POST /start_profile: capture engine steps with the torch profiler into DIR",
    )
    group.add_argument(
        "--profile-steps",
        metavar="N",
        type=positive_int,
        default=DEFAULT_STEPS,
        help="engine steps one /start_profile captures (default %(default)s)",
    )
    group.add_argument(
        "--profile-min-seconds",
        metavar="S",
        type=seconds,
        default=DEFAULT_MIN_S,
        help="and capture on until S seconds have passed, so that servers with short and long "
        "steps cover the same time (default %(default)s)",
    )
