"""`python -m dispatcher` is the `dispatcher` command."""

from .cli import main

raise SystemExit(main())
