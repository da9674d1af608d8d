"""The `tandem` command line: `tandem.cli.main` dispatches to one module per command group.

May import every package; nothing outside `tandem/` imports it.
"""
