"""The `tlflow` commands, one module each (as DVC's dvc/commands and git's builtin/): each
module defines `COMMAND`, a `Command` (flows/commands/base.py) holding its name, its help, the
arguments it adds to its parser and the function that runs it. flows/cli.py lists them in one
table, builds the parser from it and calls the chosen command's function. A command only
parses, calls the library or a flow and prints; what it runs lives in flows/ and tasks/."""
