"""One module per `v4d` subcommand, each exporting a click command named `command`."""
