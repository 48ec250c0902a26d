"""One module per ``isle`` subcommand: ``HELP``, ``add_arguments(parser)``, ``run(args) -> int``."""
