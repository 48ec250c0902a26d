"""One module per ``isle`` subcommand: ``add_arguments(parser)`` and ``run(args) -> int``.

The one-line help of each is in :data:`isle_fast.cli.COMMANDS`.
"""
