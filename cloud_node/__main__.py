"""`python -m cloud_node`: the same as `tandem serve cloud`."""

import sys

from cloud_node.cli import main

sys.exit(main())
