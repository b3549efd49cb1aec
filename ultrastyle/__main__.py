"""``python -m ultrastyle``: the `ultrastyle` command line, as the console script runs it (`cli.entry`)."""

from ultrastyle.cli.entry import main

main()
