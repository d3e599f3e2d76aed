"""`python -m meshweave` runs the CLI."""

import sys

from meshweave.cli import main

sys.exit(main())
