"""Placeholder until this subcommand lands."""


def add_arguments(parser):
    pass


def run(args):
    raise SystemExit("not built yet")
