"""python -m mlxcy ... (same as the `mlxcy` command)."""
import sys

from mlxcy.cli import main

sys.exit(main())
