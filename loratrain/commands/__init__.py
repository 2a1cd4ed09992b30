"""One module per `loratrain` subcommand; each is a thin shell over a library function."""
