"""One module per `topkphi` subcommand; each imports its heavy dependencies itself."""
