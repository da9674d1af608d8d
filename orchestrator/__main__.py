"""`python -m orchestrator`: the same as `tandem serve orchestrator`."""

import sys

from orchestrator.cli import main

sys.exit(main())
