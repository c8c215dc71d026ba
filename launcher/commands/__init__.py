"""One module per `distillery` subcommand; each exposes `register(subparsers)`."""
