"""``python -m isle_fast`` is the ``isle`` command."""

from isle_fast.cli import main

raise SystemExit(main())
