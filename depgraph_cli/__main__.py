"""``python -m depgraph_cli`` (e.g. under ``accelerate launch -m depgraph_cli recover ...``)."""

from .main import main

raise SystemExit(main())
