"""The floe node process, its configuration, the local cluster launcher and the CLI."""
