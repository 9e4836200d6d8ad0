"""`python -m tlflow`: the `tlflow` command."""

from tlflow.flows.cli import console

if __name__ == "__main__":
    console()
