"""tlflow wiring: the Prefect flow and the `tlflow` command. No stage logic here."""
