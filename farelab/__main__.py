"""``python -m farelab`` is the ``farelab`` command."""

from farelab._cli import main

raise SystemExit(main())
