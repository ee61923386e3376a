"""One module per `zili` subcommand: `add_arguments(parser)` sets `run=func(args) -> int`."""
