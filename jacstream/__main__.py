"""``python -m jacstream``: the same as the ``jacstream`` command."""

from .cli import main

raise SystemExit(main())
