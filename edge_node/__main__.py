import sys

from edge_node.cli import main

sys.exit(main())
