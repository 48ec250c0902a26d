"""``python -m isle_fast`` is the ``isle`` command."""

from .cli import main

raise SystemExit(main())
