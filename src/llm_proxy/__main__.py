"""`python -m llm_proxy` runs the CLI."""

from .cli import main

raise SystemExit(main())
