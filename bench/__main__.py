"""`python -m bench` runs the benchmark suite."""

from bench.cli import main

raise SystemExit(main())
